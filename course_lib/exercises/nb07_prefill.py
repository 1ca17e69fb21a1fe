"""Checks of the exercises in notebooks/07_prefill.ipynb."""

from __future__ import annotations

import torch

from .. import perf
from ..model import Trace, kv_cache_bytes
from .common import correct, require, require_number, unanswered


def check_cache_bytes(n, config) -> None:
    """Exercise 1: fp16 KV-cache bytes of one 1024-token prompt for ``config``."""
    if unanswered(n):
        return
    require_number(n)
    want = kv_cache_bytes(config, 1, 1024, bytes_per_element=2)
    require(n != want // 2, "that is half: count K and V, and 2 bytes per number")
    require(n != 2 * want, "twice too much: fp16 takes 2 bytes per number, not 4")
    require(n == want, "K and V, per layer, per head, per position, per head dimension, 2 bytes each")
    correct()


def check_fc(n, model, ids: torch.Tensor) -> None:
    """Exercise 2: FLOPs of the FFN's first product (bias included) in layer 0 for ``ids``."""
    if unanswered(n):
        return
    require_number(n)
    trace = Trace()
    with torch.no_grad():
        model(ids, trace=trace)
    want = {r.op: r for r in perf.layer_op_table(trace, 0, model)}["fc (D→F)"].flops
    rows, width = trace["h0.ln_2"].shape[0] * trace["h0.ln_2"].shape[1], model.config.mlp_dim
    require(n != want - rows * width, "the product is right; add one FLOP per output for the bias")
    require(n != (want - rows * width) // 2, "a multiply-add is 2 FLOPs")
    require(n == want, "count (B·T, D) @ (D, F): B·T·F outputs, D multiply-adds each, plus the bias")
    correct()


def check_fraction(f, T: int) -> None:
    """Exercise 3: the share of a T × T score matrix that the causal mask discards."""
    if unanswered(f):
        return
    require_number(f, "the fraction")
    from ..model import causal_mask

    want = (~causal_mask(T, T)).float().mean().item()
    require(0 <= f <= 1, "a fraction lies between 0 and 1")
    require(abs(f - want) < 1e-6, "count the entries strictly above the diagonal and divide by T·T")
    correct()
