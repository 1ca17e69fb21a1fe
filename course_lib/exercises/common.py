"""What every exercise check shares: "not answered yet" for None, hints instead of raw dumps.

A check prints ``not answered yet`` when the answer is None, raises :class:`AssertionError` with a
hint that says what is wrong (never the expected value) and prints only ``correct`` when right.
Introduced in notebooks/00_start_here.ipynb, the first notebook with exercises.
"""

from __future__ import annotations

import torch

NOT_ANSWERED = "not answered yet: see the solution below"


def unanswered(*answers) -> bool:
    """True (after saying so) when any answer is still None."""
    if any(a is None for a in answers):
        print(NOT_ANSWERED)
        return True
    return False


def correct() -> None:
    print("correct")


def require(condition, hint: str) -> None:
    """Raise an AssertionError with ``hint`` unless ``condition`` holds."""
    if not condition:
        raise AssertionError(hint)


def require_number(x, what: str = "the answer") -> None:
    require(isinstance(x, (int, float)) and not isinstance(x, bool),
            f"{what} should be a number, got {type(x).__name__}")


def require_close(got, want: torch.Tensor, hint: str, shape_hint: str = "", atol: float = 1e-5,
                  rtol: float = 1e-5) -> None:
    """``got`` must be a tensor of ``want``'s shape and close to it; otherwise a hint, not a dump.

    The message names what is wrong (not a tensor, the shape, how far off) but never ``want``.
    """
    require(isinstance(got, torch.Tensor), f"the answer should be a torch tensor, got {type(got).__name__}")
    require(tuple(got.shape) == tuple(want.shape),
            f"the shape {tuple(got.shape)} is wrong" + (f": {shape_hint}" if shape_hint else ""))
    got = got.detach().to(want.device, want.dtype)
    if torch.isnan(got).any():
        raise AssertionError(f"the answer contains NaN; {hint}")
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        diff = (got - want).abs().max().item()
        raise AssertionError(f"{hint} (the largest difference is {diff:.3g})")
