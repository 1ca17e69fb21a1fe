"""Checks of the exercises in notebooks/02_q_k_v.ipynb."""

from __future__ import annotations

import torch

from ..model import Trace
from .common import correct, require, require_close, unanswered


def check_k1(k1, model, ids: torch.Tensor) -> None:
    """Exercise 1: the keys of layer 1 for the prompt ``ids`` (1, T), heads side by side: (T, D)."""
    if unanswered(k1):
        return
    trace = Trace()
    with torch.no_grad():
        model(ids, trace=trace)
    k = trace["h1.attn.k"][0]                                      # (H, T, Dh)
    want = k.transpose(0, 1).reshape(k.shape[1], -1)               # (T, D)
    require_close(k1, want, "the values differ from layer 1's keys: use layer 1's input (h1.ln_1), the "
                  "K part of its c_attn (the middle D columns) and the matching part of the bias",
                  shape_hint="it should be (T, D): one row per token")
    correct()


def check_macs(fn, D: int) -> None:
    """Exercise 2: ``fn(T)``, multiply-adds of the Q/K/V projection of one layer."""
    if unanswered(fn(10)):
        return
    for t in (1, 10, 128):
        got = fn(t)
        require(got != t * D * D, f"T={t}: that is one projection; Q, K and V are three")
        require(got == t * D * 3 * D, f"T={t}: wrong count; each of the T rows is multiplied by a (D, 3D) matrix")
    correct()


def check_rows(answer, model) -> None:
    """Exercise 3: which rows of V change when the input of token 2 of 6 changes."""
    if unanswered(answer):
        return
    require(isinstance(answer, (set, list, tuple)), "answer with a set of row indices, e.g. {0, 1}")
    attn = model.transformer.h[0].attn.c_attn
    D = attn.weight.shape[0]
    W_v, b_v = attn.weight.detach()[:, 2 * D:], attn.bias.detach()[2 * D:]
    x6 = torch.randn(6, D, generator=torch.Generator().manual_seed(0)).to(W_v.device)
    before = x6 @ W_v + b_v
    x6[2] += 1.0
    moved = {int(i) for i in torch.nonzero(((x6 @ W_v + b_v) - before).abs().amax(1) > 1e-6)}
    require(set(answer) == moved, "measured, a different set of rows moves: a projection multiplies each "
                                  "row by the same matrix, on its own")
    correct()
