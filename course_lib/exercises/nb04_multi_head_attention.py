"""Checks of the exercises in notebooks/04_multi_head_attention.ipynb."""

from __future__ import annotations

import numpy as np
import torch

from ..model import Trace
from .common import correct, require, require_close, require_number, unanswered


def check_merge(fn, model, ids: torch.Tensor, layer: int = 1) -> None:
    """Exercise 1: ``fn(t)`` turns per-head outputs (B, H, T, Dh) into (B, T, D)."""
    trace = Trace()
    with torch.no_grad():
        model(ids, trace=trace)
    heads = trace[f"h{layer}.attn.head_out"]                      # (B, H, T, Dh)
    got = fn(heads)
    if unanswered(got):
        return
    require_close(got, trace[f"h{layer}.attn.merged"],
                  "the numbers are in the wrong places: move the head axis next to Dh before reshaping "
                  "(a plain view/reshape of (B, H, T, Dh) mixes tokens and heads)",
                  shape_hint="it should be (B, T, D), with D = H · Dh")
    correct()


def check_n_weights(fn, model) -> None:
    """Exercise 2: ``fn(B, T)``, attention weights of one layer, masked ones included."""
    if unanswered(fn(1, 1)):
        return
    dev = model.transformer.wte.weight.device
    for b, t in [(1, 5), (2, 7), (3, 16)]:
        trace = Trace()
        with torch.no_grad():
            model(torch.zeros(b, t, dtype=torch.long, device=dev), trace=trace)
        got, want = fn(b, t), trace["h0.attn.weights"].numel()
        require(got != want // model.config.n_head, f"B={b}, T={t}: that is one head's count; every head has its own")
        require(got == want, f"B={b}, T={t}: wrong count; one T × T matrix per head and per sequence")
    correct()


def check_heads_above_even(n, scores, even_share: float) -> None:
    """Exercise 3: how many (layer, head) pairs put more than an even share of weight on newlines."""
    if unanswered(n):
        return
    require_number(n)
    s = np.asarray(scores)
    require(0 <= n <= s.size, f"there are only {s.size} heads in all layers together")
    require(n == int((s > even_share).sum()), "not that many: compare every head's score with the even share")
    correct()
