"""Measure which tokens each row of a layer depends on, by perturbing one token at a time.

For layer ``L`` and token ``j``, add a small change to row ``j`` of the layer's *input* (a
forward pre-hook on block ``L``), run the model with a :class:`~course_lib.model.Trace`, and
see which rows of each stage moved. ``changed[i][j]`` is True when row ``i`` is not
bit-identical to the unperturbed run. Comparing that matrix with the reachability of
:func:`course_lib.viz.graph.layer_graph` checks every edge of the drawn graph against the
live model. Introduced in notebooks/09_parallel_and_sync.ipynb.
"""

from __future__ import annotations

import torch

from .errors import InputError
from .model import Trace

#: Stage of :mod:`course_lib.viz.graph` → trace name whose row ``t`` belongs to token ``t``.
#: "scores" uses the *masked* scores: the raw ``q @ kᵀ`` row also holds future columns that
#: the mask throws away (see :func:`raw_score_rows_changed`).
STAGE_TRACE = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "scores": "attn.masked",
               "softmax": "attn.weights", "aggregate": "attn.head_out", "ffn": "resid_out"}


def _row(t: torch.Tensor, i: int) -> torch.Tensor:
    return t[:, :, i] if t.dim() == 4 else t[:, i]     # (B, H, ...) per head, or (B, D)


@torch.no_grad()
def _traced(model, ids, layer, j=None, delta=1e-2, seed=0):
    handle = None
    if j is not None:
        gen = torch.Generator().manual_seed(seed + j)

        def bump(module, args):
            x = args[0].clone()
            x[:, j] += delta * torch.randn(x.shape[-1], generator=gen).to(x)
            return (x,) + tuple(args[1:])

        handle = model.transformer.h[layer].register_forward_pre_hook(bump)
    try:
        trace = Trace()
        model(ids, trace=trace)
    finally:
        if handle is not None:
            handle.remove()
    return trace


def token_dependencies(model, ids, layer: int = 0, delta: float = 1e-2) -> dict:
    """For every stage: ``changed[i][j]`` = row ``i`` differs (at all) after perturbing token ``j``."""
    ids = model.check_token_ids(ids)
    if not 0 <= layer < model.config.n_layer:
        raise InputError(f"layer must be in 0..{model.config.n_layer - 1}, got {layer}")
    T = ids.shape[1]
    base = _traced(model, ids, layer)
    out = {s: [[False] * T for _ in range(T)] for s in STAGE_TRACE}
    for j in range(T):
        pert = _traced(model, ids, layer, j, delta)
        for stage, name in STAGE_TRACE.items():
            a, b = base[f"h{layer}.{name}"], pert[f"h{layer}.{name}"]
            for i in range(T):
                out[stage][i][j] = not torch.equal(_row(a, i), _row(b, i))
    return out


def raw_score_rows_changed(model, ids, layer: int = 0, j: int | None = None) -> list[bool]:
    """Rows of the raw (unmasked) scores that change when token ``j`` (default: last) moves.

    Every row changes, earlier ones included: row ``i < j`` holds ``q_i · k_j``, a score the
    mask then discards. Computing it was wasted work, and harmless (the masked row is
    bit-identical).
    """
    ids = model.check_token_ids(ids)
    T = ids.shape[1]
    j = T - 1 if j is None else j
    a = _traced(model, ids, layer)[f"h{layer}.attn.scores"]
    b = _traced(model, ids, layer, j)[f"h{layer}.attn.scores"]
    return [not torch.equal(a[:, :, i], b[:, :, i]) for i in range(T)]
