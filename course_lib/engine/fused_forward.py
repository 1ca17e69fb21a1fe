"""The runner's forward with fused kernels (CUDA, attention="triton"): the same math as
:meth:`ModelRunner.forward <course_lib.engine.runner.ModelRunner.forward>`, fewer launches.

Which kernel does what, per layer (reference lines on the left), for many rows (prefill; cuBLAS
products)::

    h = ln_1(x)                      embed_layernorm (layer 0: wte + wpe + ln_1), else the
                                     previous layer's add_layernorm
    qkv = c_attn(h)                  linear: our GEMV (few rows) or cuBLAS addmm
    kv.write(k, v)                   triton_cache_write
    o = attention(q, k, v)           triton_unified
    x = x + c_proj(o); h = ln_2(x)   projection (GEMV split-K partials, or cuBLAS mm) summed with
                                     its bias and the residual inside add_layernorm: one kernel
    f = gelu(c_fc(h))                linear with the GELU in the GEMV's epilogue (or in cuBLASLt's
                                     bias + GELU epilogue)
    x = x + c_proj(f); h = ln(x)     projection + add_layernorm with the next layer's ln_1; after
                                     the last layer with ln_f on the logit rows only
    logits = h @ wte.T               linear into the shared logits buffer

and where a product runs as the row kernel in one split (:func:`FusedForward.fused_plan`: decode
steps of one or two rows, and the products that one split serves at 3-32 rows), its neighbours
move into it (triton_gemv.gemv_fused), so a one-row layer is four kernels besides the attention::

    qkv = c_attn(ln_1(x)); kv.write  the LayerNorm computed by every program from the whole row,
                                     the key and value columns stored into the pool as well
    x = x + c_proj(o)                the residual added in the epilogue
    f = gelu(c_fc(ln_2(x)))          LayerNorm, product, bias, GELU
    x = x + c_proj(f)                the residual again

The LM head is ``wte`` padded with zero rows to a multiple of 64 (:func:`padded_vocab`), so the
logits rows are aligned for cuBLAS; the columns past the vocabulary are never read.

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

from ..errors import InputError
from ..model import gelu
from .triton_fused import add_layernorm, bias_gelu, embed_layernorm
from .triton_gemv import KVWrite, fusable, gemv, gemv_fused, gemv_partials, plan_gemv


def padded_vocab(V: int) -> int:
    """The logits' width for a vocabulary of ``V``: the next multiple of 64."""
    return -(-V // 64) * 64


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
        # the LM head (tied to wte) padded with zero rows to a multiple of 64 tokens: cuBLAS's fast
        # kernels need the logits' width aligned; GPT-2's 50,257 is odd, and on an H200 its fallback
        # kernel took 155 us for 64 rows of the 124M head at prefill
        # (benchmarks/results/2026-12-02_nvidia-h200_step_profile_fused.md). wte becomes a view of its
        # first V rows: same values, one copy; the pad columns of the logits are never read.
        wte = self.model.transformer.wte.weight
        V, D = wte.shape
        width = padded_vocab(V)
        self.head = wte.data                                     # (width, D)
        if width != V:
            self.head = torch.zeros(width, D, dtype=wte.dtype, device=wte.device)
            self.head[:V] = wte.data
            wte.data = self.head[:V]

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

    def fused_plan(self, M: int, lin, ln: bool = False):
        """The row kernel's config for ``lin`` at ``M`` rows when it can take its neighbours in
        (gemv_fused: one split, one rank), else ``None``. ``ln``: the LayerNorm before it too,
        which only the one- or two-row kernel takes (on the tensor cores every program would
        normalise a whole (rows, K) tile in fp32 registers: at 32 rows the GPT-2 124M step was
        0.55 ms a replay with a separate LayerNorm and 0.60 with it fused, on an H200)."""
        config = self.plan(M, lin.weight)
        if self.runner.tp is not None or not fusable(config, lin.weight.shape[0]) or (ln and config.use_dot):
            return None
        return config

    @torch.inference_mode()
    def forward(self, b, logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(R, V)`` for the rows in ``b.logits_indices``; writes every new token's K/V.

        The residual stream is ``x`` plus ``pending``, a projection's ``(delta, delta_bias)`` not
        added in yet (add_layernorm adds it with the next LayerNorm); ``h`` is that LayerNorm when
        it has been computed. A product that gemv_fused can run takes its LayerNorm, residual add
        and K/V write in itself instead."""
        runner, tr = self.runner, self.model.transformer
        if logits_out is not None and logits_out.shape[1] != self.head.shape[0]:
            raise InputError(f"logits_out must be {self.head.shape[0]} wide (runner.logits_width), got "
                             f"{tuple(logits_out.shape)}")
        N = b.input_ids.shape[0]
        H, Dh = runner.kv.num_heads, runner.config.head_dim
        fed = None if b.feed_rows is None else runner.sampled_tokens      # the device-fed ids, in the same launch
        x, h = embed_layernorm(b.input_ids, b.positions, tr.wte.weight, tr.wpe.weight, tr.h[0].ln_1,
                               feed_rows=b.feed_rows, fed_tokens=fed)        # (N, D) each
        pending = None
        for layer, block in enumerate(tr.h):
            attn, mlp = block.attn, block.mlp
            qkv_plan = self.fused_plan(N, attn.c_attn)
            kv = None if qkv_plan is None else KVWrite(runner.kv.k[layer], runner.kv.v[layer], b.slot_mapping, H * Dh)
            if pending is None and self.fused_plan(N, attn.c_attn, ln=True) is not None:   # LN + QKV + K/V write
                qkv = gemv_fused(x, attn.c_attn.weight, attn.c_attn.bias, qkv_plan, ln=block.ln_1, kv_write=kv)
            else:
                if h is None:
                    x, h = add_layernorm(x, block.ln_1, *(pending or ()))
                if qkv_plan is None:
                    qkv = self.linear(h, attn.c_attn.weight, attn.c_attn.bias)           # (N, 3 H Dh)
                else:                                                                      # QKV + K/V write
                    qkv = gemv_fused(h, attn.c_attn.weight, attn.c_attn.bias, qkv_plan, kv_write=kv)
            q, k, v = (t.view(N, H, Dh) for t in qkv.split(H * Dh, dim=-1))             # (N, H, Dh)
            if kv is None:
                runner.kv.write(layer, k, v, b.slot_mapping)
            o = runner.attention.forward(q, k, v, runner.kv, layer, b.attention).reshape(N, H * Dh)  # (N, D)
            x, pending = self.add_projection(x, o, attn.c_proj)
            fc_plan = self.fused_plan(N, mlp.c_fc, ln=True)
            if fc_plan is not None and pending is None and self.tanh_gelu:                 # LN + c_fc + GELU
                f = gemv_fused(x, mlp.c_fc.weight, mlp.c_fc.bias, fc_plan, ln=block.ln_2, gelu=True)
            else:
                x, h = add_layernorm(x, block.ln_2, *(pending or ()))
                f = self.linear(h, mlp.c_fc.weight, mlp.c_fc.bias, act=True)                      # (N, F)
            x, pending = self.add_projection(x, f, mlp.c_proj)
            h = None
        _, h = add_layernorm(x, tr.ln_f, *(pending or ()), rows=b.logits_indices)         # (R, D): the logit rows
        V = self.model.config.vocab_size
        return self.linear(h, self.head.t(), out=logits_out)[:, :V]                     # (R, V) of (R, width)

    def add_projection(self, x: torch.Tensor, inp: torch.Tensor, lin):
        """The residual stream after ``x + lin(inp)``: ``(x_new, None)`` when gemv_fused adds it in
        its epilogue, else ``(x, pending)`` for the next add_layernorm."""
        fused = self.fused_plan(inp.shape[0], lin)
        if fused is not None:
            return gemv_fused(inp, lin.weight, lin.bias, fused, residual=x), None
        return x, self.projection(inp, lin)
