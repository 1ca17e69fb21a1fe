"""The runner's forward with fused kernels (CUDA, attention="triton"): the same math as
:meth:`ModelRunner.forward <course_lib.engine.runner.ModelRunner.forward>`, fewer launches.

Which kernel does what, per layer (reference lines on the left)::

    h = ln_1(x)                      embed_layernorm (layer 0: wte + wpe + ln_1), else the
                                     previous layer's add_layernorm
    qkv = c_attn(h)                  linear: our GEMV (few rows) or cuBLAS addmm
    kv.write(k, v)                   triton_cache_write (unchanged)
    o = attention(q, k, v)           triton_unified (unchanged)
    x = x + c_proj(o); h = ln_2(x)   projection (GEMV split-K partials, or cuBLAS mm) summed with
                                     its bias and the residual inside add_layernorm: one kernel
    f = gelu(c_fc(h))                linear with the GELU in the GEMV's epilogue (or in cuBLASLt's
                                     bias + GELU epilogue)
    x = x + c_proj(f); h = ln(x)     projection + add_layernorm with the next layer's ln_1; after
                                     the last layer with ln_f on the logit rows only
    logits = h @ wte.T               linear into the shared logits buffer

The four projections of every layer are stored K-contiguous (``W.T`` row-major) when the fused
forward is built, so that a decode GEMV reads whole weight rows (triton_gemv.py's row kernel).
"Few rows" and each GEMV's kernel and launch shape come from
:func:`~course_lib.engine.triton_gemv.plan_gemv` for the step's static row count, so a captured
graph's kernels are fixed per token bucket. With
tensor parallelism a projection's output is first completed (bias included) and all-reduced,
then added: the partial sums of split-K never cross ranks.
"""

from __future__ import annotations

import torch

from ..model import gelu
from .triton_fused import add_layernorm, bias_gelu, embed_layernorm
from .triton_gemv import gemv, gemv_partials, plan_gemv


class FusedForward:
    """The fused forward of one :class:`~course_lib.engine.runner.ModelRunner`."""

    def __init__(self, runner):
        self.runner = runner
        self.model = runner.model
        self.tanh_gelu = runner.fused_gelu        # GPT-2's tanh GELU: fused; other activations run after
        self._plans = {}
        # every projection stored K-contiguous (W.T row-major, the nn.Linear layout): the decode
        # GEMVs then read whole weight rows (triton_gemv's row kernel, ~1.6x cuBLAS's stream at one
        # row), and cuBLAS is as fast on it for many rows. Same values and shapes; one copy.
        for block in self.model.transformer.h:
            for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                if lin.weight.stride(0) != 1:
                    lin.weight.data = lin.weight.data.t().contiguous().t()

    def plan(self, M: int, w: torch.Tensor):
        key = (M, tuple(w.shape), w.stride(0) == 1)
        if key not in self._plans:
            self._plans[key] = plan_gemv(M, w.shape[0], w.shape[1], k_contiguous=w.stride(0) == 1)
        return self._plans[key]

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, act: bool = False,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """``x (M, K) @ w (K, N) (+ bias) (then the MLP's activation)`` → (M, N)."""
        config = self.plan(x.shape[0], w)
        fuse_act = act and self.tanh_gelu
        if config is not None:
            y = gemv(x, w, bias, gelu=fuse_act, out=out, config=config)
        elif fuse_act and x.is_cuda and bias is not None:   # cuBLASLt's GELU-and-bias epilogue: the tanh GELU, one kernel
            y = torch._addmm_activation(bias, x, w, use_gelu=True)
        elif fuse_act:                    # the interpreter's CPU (torch's CPU epilogue is erf's GELU)
            y = bias_gelu(torch.mm(x, w), bias)
        elif bias is not None:
            y = torch.addmm(bias, x, w)
        else:
            y = torch.mm(x, w, out=out) if out is not None else torch.mm(x, w)
        if act and not fuse_act:
            y = gelu(y, self.model.config.activation_function)
        return y

    def projection(self, x: torch.Tensor, layer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(delta, delta_bias)`` for add_layernorm: the row-split product ``layer(x)`` as GEMV
        split-K partials (S, N, D) or a cuBLAS product (N, D), with its bias still to add; with
        tensor parallelism the whole product all-reduced over the ranks (bias included)."""
        if self.runner.tp is not None:
            return self.runner.all_reduce(self.linear(x, layer.weight, layer.bias)), None
        config = self.plan(x.shape[0], layer.weight)
        if config is None:
            return torch.mm(x, layer.weight), layer.bias
        return gemv_partials(x, layer.weight, config), layer.bias

    @torch.inference_mode()
    def forward(self, b, logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(R, V)`` for the rows in ``b.logits_indices``; writes every new token's K/V."""
        runner, tr = self.runner, self.model.transformer
        N = b.input_ids.shape[0]
        H, Dh = runner.kv.num_heads, runner.config.head_dim
        x, h = embed_layernorm(runner.token_ids(b), b.positions, tr.wte.weight, tr.wpe.weight, tr.h[0].ln_1)  # (N, D)
        last = len(tr.h) - 1
        for layer, block in enumerate(tr.h):
            qkv = self.linear(h, block.attn.c_attn.weight, block.attn.c_attn.bias)        # (N, 3 H Dh)
            q, k, v = (t.view(N, H, Dh) for t in qkv.split(H * Dh, dim=-1))             # (N, H, Dh)
            runner.kv.write(layer, k, v, b.slot_mapping)
            o = runner.attention.forward(q, k, v, runner.kv, layer, b.attention)          # (N, H, Dh)
            x, h = add_layernorm(x, block.ln_2, *self.projection(o.reshape(N, H * Dh), block.attn.c_proj))
            f = self.linear(h, block.mlp.c_fc.weight, block.mlp.c_fc.bias, act=True)      # (N, F)
            if layer < last:
                x, h = add_layernorm(x, tr.h[layer + 1].ln_1, *self.projection(f, block.mlp.c_proj))
            else:                                                                          # (R, D): ln_f of the logit rows
                _, h = add_layernorm(x, tr.ln_f, *self.projection(f, block.mlp.c_proj), rows=b.logits_indices)
        return self.linear(h, self.model.lm_head.weight.t(), out=logits_out)              # (R, V)
