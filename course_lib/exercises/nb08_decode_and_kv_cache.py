"""Checks of the exercises in notebooks/08_decode_and_kv_cache.ipynb."""

from __future__ import annotations

import torch

from .. import perf
from ..model import Trace
from .common import correct, require, require_close, require_number, unanswered


def check_attend(fn, model, ids: torch.Tensor, layer: int = 2) -> None:
    """Exercise 1: ``fn(q, K, V)``: one query (H, Dh) against a cache (H, S, Dh) -> weights, output."""
    with torch.no_grad():
        _, cache = model.prefill(ids[:, :-1])
        trace = Trace()
        model.decode_step(ids[:, -1], cache, trace=trace)
    q, K, V = trace[f"h{layer}.attn.q"][0, :, 0], trace[f"h{layer}.attn.k"][0], trace[f"h{layer}.attn.v"][0]
    w, out = fn(q, K, V)
    if unanswered(w, out):
        return
    require_close(w, trace[f"h{layer}.attn.weights"][0, :, 0],
                  "the weights differ: scores q·k for every cached key, scaled by 1/√Dh, then a softmax over keys",
                  shape_hint="the weights should be (H, S): one per head and cached key")
    require_close(out, trace[f"h{layer}.attn.head_out"][0, :, 0],
                  "the weights are right but the output differs: the weighted sum of the cached values",
                  shape_hint="the output should be (H, Dh)")
    correct()


def check_cache_after(n, model) -> None:
    """Exercise 2: bytes of the fp32 cache after a 50-token prefill and 30 decode steps, batch 4."""
    if unanswered(n):
        return
    require_number(n)
    dev = model.transformer.wte.weight.device
    c = perf.random_cache(model.config, 4, 50, device=dev)            # as a 50-token prefill leaves it
    with torch.no_grad():
        for _ in range(30):
            model.decode_step(torch.zeros(4, dtype=torch.long, device=dev), c)
    require(n != c.nbytes() * 50 // 80, "that is the cache right after prefill: the 30 steps add positions")
    require(n != c.nbytes() // 4, "those are numbers; each fp32 number takes 4 bytes")
    require(n == c.nbytes(), "wrong count: K and V, per layer, sequence, head, position and head dim, 4 bytes")
    correct()


def cached_vs_recompute_flops(config, n: int, P: int = 8) -> tuple[float, float]:
    """FLOPs of generating ``n`` tokens after a ``P``-token prompt, with and without a cache."""
    with_cache = perf.prefill_cost(config, P).total_flops + sum(
        perf.decode_cost(config, P + s).total_flops for s in range(n - 1))
    without = sum(perf.prefill_cost(config, P + s).total_flops for s in range(n))
    return with_cache, without


def check_n(n, config) -> None:
    """Exercise 3: the smallest n at which recomputing costs more than 50× the cached total."""
    if unanswered(n):
        return
    require(isinstance(n, int) and n >= 2, "n should be a whole number of tokens, at least 2")
    w, wo = cached_vs_recompute_flops(config, n)
    require(wo > 50 * w, f"at n = {n} recomputing costs {wo / w:.1f}× the cached total: not yet 50×")
    w1, wo1 = cached_vs_recompute_flops(config, n - 1)
    require(not wo1 > 50 * w1, f"already n - 1 = {n - 1} tokens pass 50×: look for the smallest n")
    correct()
