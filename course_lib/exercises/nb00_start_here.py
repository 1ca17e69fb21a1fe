"""Checks of the exercises in notebooks/00_start_here.ipynb."""

from __future__ import annotations

import torch

from ..model import Trace, kv_cache_bytes
from .common import correct, require, require_number, unanswered


def check_cache_bytes(n, config) -> None:
    """Exercise 1: bytes of the float32 KV cache for 8 prompts of 100 tokens."""
    if unanswered(n):
        return
    require_number(n)
    want = kv_cache_bytes(config, batch=8, seq_len=100, bytes_per_element=4)
    require(n != want // 4, "that is the number of numbers; each float32 number takes 4 bytes")
    require(n != want // 2, "that is half of it: the cache holds K *and* V")
    require(n == want, "count K and V, for every layer, prompt, head, position and head dimension, 4 bytes each")
    correct()


def check_keys_seen(n, model, ids: torch.Tensor, steps: int) -> None:
    """Exercise 2: how many keys the query of the last of ``steps`` decode steps attends to."""
    if unanswered(n):
        return
    require_number(n)
    with torch.no_grad():
        logits, cache = model.prefill(ids)
        for _ in range(steps):
            trace = Trace()
            logits = model.decode_step(logits.argmax(-1), cache, trace=trace)
    seen = trace["h0.attn.weights"].shape[-1]                    # (B, H, 1, S): S keys
    require(n != seen - 1, "one short: the new token's own key is appended before it attends")
    require(n == seen, "count the prompt's cached keys and every key the decode steps appended")
    correct()
