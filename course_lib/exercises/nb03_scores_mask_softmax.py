"""Checks of the exercises in notebooks/03_scores_mask_softmax.ipynb."""

from __future__ import annotations

import torch

from ..model import causal_mask
from .common import correct, require, require_close, require_number, unanswered


def check_mask(fn) -> None:
    """Exercise 1: ``fn(T)``, the additive causal mask: 0 where visible, -inf where hidden."""
    if unanswered(fn(3)):
        return
    for n in (1, 4, 9):
        m = fn(n)
        require(isinstance(m, torch.Tensor), f"T={n}: return a torch tensor, got {type(m).__name__}")
        require(tuple(m.shape) == (n, n), f"T={n}: the shape {tuple(m.shape)} is wrong: one row per query, one column per key")
        visible = causal_mask(n, n)
        require(bool((m[visible] == 0).all()), f"T={n}: a query's own and earlier keys must get 0")
        require(bool(torch.isneginf(m[~visible]).all()), f"T={n}: every later key must get -inf")
    correct()


def check_softmax(fn) -> None:
    """Exercise 2: a numerically safe softmax of one row, -inf entries allowed."""
    if unanswered(fn(torch.zeros(2))):
        return
    for row in [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1000.0, 1001.0, float("-inf")]),
                torch.tensor([0.5, float("-inf"), float("-inf"), -2.0])]:
        got = fn(row)
        require(isinstance(got, torch.Tensor), f"return a torch tensor, got {type(got).__name__}")
        require(not torch.isnan(got).any(), f"NaN for the row {row.tolist()}: subtract the row's maximum before exp")
        require_close(got, torch.softmax(row, dim=-1),
                      f"wrong weights for the row {row.tolist()}: exp of each entry, divided by their sum",
                      shape_hint="one weight per entry of the row", atol=1e-6, rtol=1e-5)
    correct()


def check_tau(t, Q: torch.Tensor, K: torch.Tensor, query: int = 2) -> None:
    """Exercise 3: a temperature at which query ``query`` puts > 0.95 of its weight on token 0."""
    if unanswered(t):
        return
    require_number(t, "tau")
    require(t > 0, "a temperature must be positive")
    from ..widgets.attention import attention_steps

    w = attention_steps(Q, K, temperature=t)["weights"][query]
    require(float(w[0]) > 0.95, f"with tau={t}, C gives A only {float(w[0]):.3f} of its weight: "
                                "a lower temperature sharpens the weights")
    correct()
