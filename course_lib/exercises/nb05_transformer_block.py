"""Checks of the exercises in notebooks/05_transformer_block.ipynb."""

from __future__ import annotations

import torch

from ..config import GPTConfig
from ..model import GPT, Trace
from .common import correct, require, require_close, unanswered


def check_mlp(fn, model, ids: torch.Tensor) -> None:
    """Exercise 1: ``fn(h, blk)``, the MLP of a block by hand."""
    trace = Trace()
    with torch.no_grad():
        model(ids, trace=trace)
    got = fn(trace["h0.ln_2"][0], model.transformer.h[0])
    if unanswered(got):
        return
    require_close(got, trace["h0.mlp.out"][0], "the MLP's output differs: c_fc (weight and bias), then "
                  "gelu(·, 'gelu_new'), then c_proj (weight and bias)", shape_hint="it should be (T, D)")
    correct()


def check_params(fn, block) -> None:
    """Exercise 2: ``fn(D)``, parameters of one GPT-2 block with MLP width 4D."""
    D = block.ln_1.weight.shape[0]
    if unanswered(fn(D)):
        return
    n = sum(p.numel() for p in block.parameters())
    got = fn(D)
    weights_only = n - (2 * 2 * D + 3 * D + D + 4 * D + D)
    require(got != weights_only, "the weight matrices are right; add the biases and the LayerNorms' γ and β")
    require(got == n, "count every weight and bias: two LayerNorms, c_attn, c_proj (W_o), c_fc, the MLP's c_proj")
    big = GPT(GPTConfig(vocab_size=1, n_positions=1, n_embd=768, n_layer=1, n_head=12)).transformer.h[0]
    require(fn(768) == sum(p.numel() for p in big.parameters()),
            "right for this model but not for D = 768: write it as a formula of D")
    correct()


def check_no_ln(answer, model, ids: torch.Tensor, layer: int = 1) -> None:
    """Exercise 3: does the block give the model's output without its LayerNorms? (True/False)"""
    if unanswered(answer):
        return
    require(isinstance(answer, bool), "answer True or False")
    trace = Trace()
    with torch.no_grad():
        model(ids, trace=trace)
        x = trace["embed.sum"] if layer == 0 else trace[f"h{layer - 1}.resid_out"]
        block = model.transformer.h[layer]
        y = x + block.attn(x)
        y = y + block.mlp(y)
    same = torch.allclose(y, trace[f"h{layer}.resid_out"], atol=1e-4)
    require(answer == same, "the experiment says otherwise: run the block without ln_1 and ln_2 and compare")
    correct()
