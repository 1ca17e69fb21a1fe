"""Fused element-wise kernels of a step: fewer launches, each reading its inputs once.

* :func:`add_layernorm` — the residual add and the next LayerNorm in one kernel: ``x + delta
  (+ bias)`` written back as the new residual stream, and its LayerNorm, from one read of each
  input. ``delta`` may be the fp32 split-K partials of a GEMV (triton_gemv.py), summed here, so
  the projection before it needs no reduction kernel of its own. With ``rows`` it reads only those
  rows (the logit rows, for ``ln_f``) and writes only the LayerNorm.
* :func:`embed_layernorm` — token + position embeddings and the first layer's ``ln_1``.
* :func:`bias_gelu` — bias and tanh-GELU after a bias-less matmul (many rows on the CPU, through the
  interpreter; on CUDA cuBLASLt's bias + GELU epilogue does it inside the matmul).

Each sum is rounded to the residual stream's dtype before its LayerNorm, as the reference's
separate add then LayerNorm do. One program a row; statistics in fp32. Runs on CPU through the
Triton interpreter (tests/test_fused_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InputError
from .pdl import pdl_enabled, pdl_launch_next, pdl_wait
from .triton_gemv import _gelu_tanh, _layernorm


@triton.jit
def _layernorm_row(x, cols, ok, D, w_ptr, b_ptr, eps):
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return _layernorm(x, ok, D, w, b, eps)


@triton.jit
def _add_layernorm_kernel(x_ptr, d_ptr, db_ptr, rows_ptr, w_ptr, b_ptr, x_out_ptr, h_ptr,
                          D, eps, stride_x, stride_ds, stride_dm, stride_xo, stride_h,
                          SPLIT: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_DBIAS: tl.constexpr, GATHER: tl.constexpr,
                          STORE_X: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_launch_next(USE_PDL)
    pdl_wait(USE_PDL)
    i = tl.program_id(0)
    row = i.to(tl.int64)
    if GATHER:
        row = tl.load(rows_ptr + i).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for s in range(0, SPLIT):
            d += tl.load(d_ptr + s * stride_ds + row * stride_dm + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_DBIAS:
            d += tl.load(db_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        x = x + d
    x = x.to(x_out_ptr.dtype.element_ty)                    # the residual stream's rounding
    if STORE_X:
        tl.store(x_out_ptr + i * stride_xo + cols, x, mask=ok)
    h = _layernorm_row(x.to(tl.float32), cols, ok, D, w_ptr, b_ptr, eps)
    tl.store(h_ptr + i * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _embed_layernorm_kernel(ids_ptr, feed_ptr, fed_ptr, pos_ptr, wte_ptr, wpe_ptr, w_ptr, b_ptr, x_ptr, h_ptr, D,
                            eps, stride_te, stride_pe, BLOCK_D: tl.constexpr, HAS_FEED: tl.constexpr,
                            USE_PDL: tl.constexpr):
    pdl_launch_next(USE_PDL)
    pdl_wait(USE_PDL)
    i = tl.program_id(0)
    tok = tl.load(ids_ptr + i).to(tl.int64)
    if HAS_FEED:                                            # a row fed on the device: the last step's token
        feed = tl.load(feed_ptr + i)
        if feed > 0:
            tok = tl.load(fed_ptr + feed - 1).to(tl.int64)
    pos = tl.load(pos_ptr + i).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    e = tl.load(wte_ptr + tok * stride_te + cols, mask=ok, other=0.0).to(tl.float32)
    p = tl.load(wpe_ptr + pos * stride_pe + cols, mask=ok, other=0.0).to(tl.float32)
    x = (e + p).to(x_ptr.dtype.element_ty)                 # rounded as wte(ids) + wpe(pos) is
    tl.store(x_ptr + i * D + cols, x, mask=ok)
    h = _layernorm_row(x.to(tl.float32), cols, ok, D, w_ptr, b_ptr, eps)
    tl.store(h_ptr + i * D + cols, h.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bias_gelu_kernel(y_ptr, b_ptr, out_ptr, N, stride_y, stride_o, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_launch_next(USE_PDL)
    pdl_wait(USE_PDL)
    m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rn < N
    y = tl.load(y_ptr + m * stride_y + rn, mask=ok, other=0.0).to(tl.float32)
    y = y + tl.load(b_ptr + rn, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_o + rn, _gelu_tanh(y).to(out_ptr.dtype.element_ty), mask=ok)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8


def layernorm_warps(R: int, D: int) -> int:
    """Warps of add_layernorm's programs (one a row) for ``R`` rows of ``D``: 4 up to 1,024 columns,
    8 above. On an H200 that was within 8 % of the best of 1-16 warps at every prefill shape, and
    16 warps took 19 % less time at XL's 32-row decode shape, alone (benchmarks/probe_add_layernorm.py,
    2026-12-06; not yet measured inside a step). The rule reads ``D`` only;
    benchmarks/probe_chain_configs.py tries rules by row count too."""
    return _warps(triton.next_power_of_2(D))


def _pdl(t: torch.Tensor) -> dict:
    """The launch arguments of programmatic dependent launch (pdl.py) for a kernel on ``t``'s device."""
    on = pdl_enabled(t.device)
    return {"USE_PDL": on, "launch_pdl": on}


def add_layernorm(x: torch.Tensor, ln: torch.nn.LayerNorm, delta: torch.Tensor | None = None,
                  delta_bias: torch.Tensor | None = None, rows: torch.Tensor | None = None):
    """``x + delta (+ delta_bias)`` and its LayerNorm ``ln`` in one launch.

    ``x`` (N, D); ``delta`` (N, D) in any float dtype or fp32 split-K partials (S, N, D), summed;
    ``delta_bias`` (D,). Returns ``(x_new, h)`` both (N, D) in ``x``'s dtype (without ``delta``,
    ``x_new`` is ``x`` itself: nothing to add, nothing written); with ``rows`` (R,) only those rows
    are read and only ``h`` (R, D) is returned (``x_new`` is None)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise InputError(f"add_layernorm needs x (N, D) with contiguous rows, got {tuple(x.shape)}")
    N, D = x.shape
    if delta is not None:
        if delta.dim() == 2:
            delta = delta.unsqueeze(0)
        if delta.shape[1:] != (N, D) or delta.stride(2) != 1:
            raise InputError(f"delta must be (N, D) = {(N, D)} or (splits, N, D) with contiguous rows, "
                             f"got {tuple(delta.shape)}")
    R = N if rows is None else rows.shape[0]
    h = torch.empty(R, D, dtype=x.dtype, device=x.device)
    x_new = torch.empty_like(x) if rows is None and delta is not None else None
    x_out = x if rows is None and delta is None else x_new        # nothing to add: the stream is x itself
    if R == 0:
        return x_out, h
    block = triton.next_power_of_2(D)
    _add_layernorm_kernel[(R,)](
        x, delta if delta is not None else x, delta_bias if delta_bias is not None else x,
        rows if rows is not None else x, ln.weight, ln.bias, x_new if x_new is not None else h, h,
        D, ln.eps, x.stride(0),
        delta.stride(0) if delta is not None else 0, delta.stride(1) if delta is not None else 0,
        x_new.stride(0) if x_new is not None else 0, h.stride(0), SPLIT=delta.shape[0] if delta is not None else 0,
        HAS_DELTA=delta is not None, HAS_DBIAS=delta_bias is not None, GATHER=rows is not None,
        STORE_X=x_new is not None, BLOCK_D=block, num_warps=layernorm_warps(R, D), **_pdl(x))
    return x_out, h


def embed_layernorm(input_ids: torch.Tensor, positions: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor,
                    ln: torch.nn.LayerNorm, feed_rows: torch.Tensor | None = None,
                    fed_tokens: torch.Tensor | None = None):
    """``x = wte[ids] + wpe[positions]`` and ``ln(x)``, both (N, D), in one launch. ``ids`` is
    ``input_ids`` (N,), except where ``feed_rows`` (N,) is > 0: there the row's id is
    ``fed_tokens[feed_rows - 1]`` (the previous step's token, still on the device: runner.token_ids
    does the same with torch, in five more launches)."""
    N, D = input_ids.shape[0], wte.shape[1]
    if (feed_rows is None) != (fed_tokens is None) or (feed_rows is not None and feed_rows.shape != input_ids.shape):
        raise InputError(f"embed_layernorm needs feed_rows and fed_tokens together, feed_rows shaped like "
                         f"input_ids {tuple(input_ids.shape)}; got "
                         f"{None if feed_rows is None else tuple(feed_rows.shape)} and "
                         f"{None if fed_tokens is None else tuple(fed_tokens.shape)}")
    x = torch.empty(N, D, dtype=wte.dtype, device=wte.device)
    h = torch.empty_like(x)
    if N:
        block = triton.next_power_of_2(D)
        has_feed = feed_rows is not None
        _embed_layernorm_kernel[(N,)](input_ids, feed_rows if has_feed else input_ids,
                                      fed_tokens if has_feed else input_ids, positions, wte, wpe, ln.weight,
                                      ln.bias, x, h, D, ln.eps, wte.stride(0), wpe.stride(0), BLOCK_D=block,
                                      HAS_FEED=has_feed, num_warps=_warps(block), **_pdl(x))
    return x, h


def bias_gelu(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(y + bias)`` for ``y`` (M, N) with contiguous rows → a new (M, N), one launch."""
    if y.dim() != 2 or y.stride(1) != 1 or bias.shape != (y.shape[1],):
        raise InputError(f"bias_gelu needs y (M, N) with contiguous rows and bias (N,), got "
                         f"{tuple(y.shape)} and {tuple(bias.shape)}")
    M, N = y.shape
    out = torch.empty_like(y)
    if M:
        block = 1024
        _bias_gelu_kernel[(M, triton.cdiv(N, block))](y, bias, out, N, y.stride(0), out.stride(0), BLOCK_N=block,
                                                       **_pdl(y))
    return out
