"""Checks of the exercises in notebooks/09_parallel_and_sync.ipynb."""

from __future__ import annotations

import math

import torch

from ..model import KVCache, causal_mask
from .common import correct, require, require_close, require_number, unanswered


def check_values(causal_answer, no_mask_answer, names=("A", "B", "C", "D"), token: int = 2) -> None:
    """Exercise 1: whose values the weighted sum of ``names[token]`` waits for, with and without the mask."""
    if unanswered(causal_answer, no_mask_answer):
        return
    from ..viz.graph import layer_graph

    for causal, answer in ((True, causal_answer), (False, no_mask_answer)):
        require(isinstance(answer, (set, list, tuple)), "answer with sets of names, e.g. {'A', 'B'}")
        graph = layer_graph(list(names), causal=causal)
        want = {names[t] for s, t in graph.parents(("aggregate", token)) if s == "v"}
        label = "with the causal mask" if causal else "without a mask"
        require(set(answer) <= set(names), f"{label}: use the token names {list(names)}")
        require(set(answer) >= want, f"{label}: a token is missing: which keys can {names[token]} see?")
        require(set(answer) <= want, f"{label}: too many: which keys can {names[token]} see?")
    correct()


def check_chunked(fn, model, ids: torch.Tensor, chunk: int = 5) -> None:
    """Exercise 2: ``fn(idx, chunk)`` -> (last logits (B, V), KVCache), calling the model chunk by chunk."""
    calls = []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append((args[0] if args else kwargs["idx"]).shape[-1]),
                                           with_kwargs=True)
    try:
        logits, cache = fn(ids, chunk)
    finally:
        hook.remove()
    if unanswered(logits, cache):
        return
    T = ids.shape[1]
    require(len(calls) > 0, "the model was never called: call model(piece, kv_cache=cache) per chunk")
    require(max(calls) <= chunk, f"one call took {max(calls)} tokens at once: give the model at most "
                                 f"{chunk} tokens per call")
    require(len(calls) == math.ceil(T / chunk) and sum(calls) == T,
            "the calls do not cover the prompt once, chunk after chunk")
    require(isinstance(cache, KVCache) and cache.seq_len == T,
            "the cache should hold every position of the prompt after the last chunk")
    with torch.no_grad():
        one_logits, one_cache = model.prefill(ids)
    require_close(logits, one_logits, "the last logits differ from a one-pass prefill: pass the same "
                  "cache to every call, and return the logits of the last position of the last chunk",
                  shape_hint="the logits should be (B, V): the last position only", atol=1e-4, rtol=1e-4)
    for a, b in zip(cache.keys, one_cache.keys):
        require_close(a, b, "the cached keys differ from a one-pass prefill", atol=1e-4, rtol=1e-4)
    correct()


def check_discarded(n, T: int = 1000) -> None:
    """Exercise 3: score entries per head that the causal mask discards for a T-token prompt."""
    if unanswered(n):
        return
    require_number(n)
    want = int((~causal_mask(T, T)).sum())
    require(n != want + T, "the diagonal is kept: a token sees its own key")
    require(n == want, "count the entries strictly above the diagonal of the T × T matrix")
    correct()
