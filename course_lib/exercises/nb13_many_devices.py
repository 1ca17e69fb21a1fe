"""Exercise checks of notebooks/13_many_devices.ipynb: each compares an answer with what the
tensor-parallel code or a simulated schedule actually does; it says what is wrong, never the answer.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..parallel import bubble_fraction, ideal_schedule, shard_model, tp_forward


def _not_answered(*answers) -> bool:
    if any(a is None for a in answers):
        print("not answered yet")
        return True
    return False


def _whole(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise AssertionError(f"{name} must be a whole number (>= 0), got {v!r}")


def check_allreduce_bytes(bytes_per_allreduce, allreduces_per_forward, model, batch: int = 2, tokens: int = 50,
                          world_size: int = 2) -> None:
    """Bytes of one all-reduce and all-reduces per forward of ``model`` on ``batch`` × ``tokens`` (fp32).

    The check runs rank 0's tensor-parallel forward with an all-reduce that only counts what it
    is given (so its logits are wrong, but the bytes and the count are the real ones).
    """
    if _not_answered(bytes_per_allreduce, allreduces_per_forward):
        return
    _whole("bytes_per_allreduce", bytes_per_allreduce)
    _whole("allreduces_per_forward", allreduces_per_forward)
    if model is None:
        raise InputError("give the model the question is about")
    seen = []
    shard = shard_model(model, 0, world_size)
    ids = torch.zeros(batch, tokens, dtype=torch.long)
    tp_forward(shard, ids, all_reduce=lambda t: seen.append(t.numel() * t.element_size()))
    assert allreduces_per_forward == len(seen), (
        f"{allreduces_per_forward} all-reduces per forward is not what the code does: how many sync points "
        "does one layer have, and how many layers are there?")
    assert bytes_per_allreduce == seen[0], (
        f"{bytes_per_allreduce:,} bytes is not the size of the all-reduced tensor: it has one row per token "
        "of every sequence and one column per model dimension, each an fp32 number")
    print("correct")


def check_bubble(fraction, n_stages: int = 4, n_micro: int = 12) -> None:
    """The idle share of ``n_stages`` equal stages fed ``n_micro`` micro-batches (a simulated schedule)."""
    if _not_answered(fraction):
        return
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise AssertionError(f"give a fraction between 0 and 1, got {fraction!r}")
    measured = bubble_fraction(ideal_schedule(n_stages, n_micro), n_stages)
    assert abs(fraction - measured) < 1e-3, (
        f"{fraction:.3f} is not the idle share of that schedule: count the steps from the first stage's "
        "start to the last stage's end, and the steps each stage actually works")
    print("correct")


def check_shard_mlp(shard_mlp, world_sizes=(2, 4), seed: int = 0) -> None:
    """``shard_mlp(W_fc, b_fc, W_proj, rank, world_size)`` → rank's ``(W_fc part, b_fc part, W_proj part)``.

    Right when, for every world size, the sum over ranks of ``gelu(x @ W_fc_r + b_fc_r) @ W_proj_r``
    equals ``gelu(x @ W_fc + b_fc) @ W_proj`` and each rank holds 1/N of the weights.
    """
    if _not_answered(shard_mlp):
        return
    from ..model import gelu

    gen = torch.Generator().manual_seed(seed)
    D, F, T = 16, 64, 5
    W_fc, b_fc = torch.randn(D, F, generator=gen), torch.randn(F, generator=gen)
    W_proj, x = torch.randn(F, D, generator=gen), torch.randn(T, D, generator=gen)
    full = gelu(x @ W_fc + b_fc, "gelu_new") @ W_proj                       # (T, D)
    for n in world_sizes:
        total = torch.zeros_like(full)
        for r in range(n):
            parts = shard_mlp(W_fc, b_fc, W_proj, r, n)
            if parts is None or any(p is None for p in parts):
                print("not answered yet")
                return
            fc, bias, proj = (torch.as_tensor(p) for p in parts)
            n_weights = fc.numel() + proj.numel()
            assert n_weights * n == W_fc.numel() + W_proj.numel(), (
                f"with {n} ranks, rank {r} holds {n_weights} weights: each rank should hold an equal share "
                "of W_fc and W_proj, no more")
            try:
                total += gelu(x @ fc + bias, "gelu_new") @ proj
            except RuntimeError as e:
                raise AssertionError(f"rank {r}'s parts do not fit together ({e}); the columns you take from W_fc "
                                     "are the hidden units, and W_proj needs the rows of the same units") from None
        assert torch.allclose(total, full, atol=1e-4), (
            f"with {n} ranks, the partial outputs do not add up to the full MLP: does each rank take a block of "
            "W_fc's columns, the same units of b_fc, and the matching rows of W_proj?")
    print("correct")
