"""Decode GEMVs of our own: ``y = x @ W (+ bias) (then GELU)`` for a handful of token rows.

At decode a step multiplies a few token rows (M = batch, often 1) by every weight matrix of the
model, so its time is the time to stream the weights from memory once: GPT-2 XL's 48 layers x 4
products + the LM head are ~3.1 GB of bf16, ~0.74 ms at the H200's ~4.2 TB/s. cuBLAS picks its
kernels for matmuls, and at one row streams these 5-20 MB matrices at ~1-2.4 TB/s.

Two kernels, both reading ``W`` as a ``(K, N)`` view of any strides:

* **the row kernel** (:class:`RowsConfig`) for weights stored K-contiguous (``W.T`` row-major, the
  ``nn.Linear`` layout, which the engine gives every projection; the LM head ``wte.t()`` already
  is): a program takes ``block_n`` whole weight rows (or their ``1/split`` share of K), loads all
  of them in one go *before* it waits for the kernel ahead (programmatic dependent launch,
  pdl.py), then takes the dot products with the token rows: one or two rows a multiply-and-sum
  each on the CUDA cores, more rows ``tl.dot`` on tiles of 16-64 rows (``use_dot``). The loads of
  the next product stream while the one ahead finishes: GPT-2 XL's weight products for one token
  back to back take 1.01 ms (3.1 TB/s) against cuBLAS's 1.63 ms (benchmarks/probe_gemv_rows.py on
  an H200).
* **the tile kernel** (:class:`GemvConfig`, up to :data:`GEMV_MAX_ROWS` rows): a program takes a
  ``BLOCK_N``-column slice of ``W`` and a ``1/split`` share of its K rows (**split-K**), with an fp32
  accumulator of ``(BLOCK_M, BLOCK_N)``: for one row a multiply-and-sum on the CUDA cores, for
  several rows ``tl.dot`` on tiles of 16 rows, padded (tensor cores; the padding costs no memory
  traffic; more than 16 rows take more row tiles, a third grid axis). It serves the LM heads at
  3-32 rows (4x cuBLAS at 8 rows) and shapes the table lacks.

With one split the bias and GELU are applied in the epilogue and the result is written in the
input's dtype; with ``split > 1`` each program writes an fp32 partial ``(split, M, N)`` that a
consumer sums: :func:`splitk_reduce` (bias, GELU, cast: one small kernel), or the fused residual
add + LayerNorm of triton_fused.py, which takes the partials directly.

Which kernel runs for which shape is a host decision made when the step is captured
(:func:`plan_gemv`: a table measured on the H200, else a rule from the shape); ``None`` means
cuBLAS. Runs on CPU through the Triton interpreter (tests/test_fused_kernels.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..errors import InputError
from .pdl import pdl_enabled, pdl_launch_next, pdl_wait

#: the most token rows plan_gemv gives our kernels (the tile kernel tiles rows by 16; past this cuBLAS is the better choice)
GEMV_MAX_ROWS = 64
#: the most rows a shape missing from MEASURED gives the tile kernel; more go to cuBLAS
DEFAULT_MAX_ROWS = 8
#: programs to aim for with split-K: about two per SM of an H200 (132 SMs)
TARGET_PROGRAMS = 264
#: fewest K rows a split may get (shorter ones spend more on partials than they save)
MIN_K_PER_SPLIT = 256
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
#: the most token rows the row kernel takes: each row is its own multiply-and-sum pass, and on an
#: H200 it beat cuBLAS on every GPT-2 product at one and two rows but lost on XL's wide ones at four
#: (benchmarks/probe_gemv_rows.py, part rows_m)
ROWS_MAX_M = 2
#: programs a row-kernel launch aims for: its ``block_n`` is the widest of 8, 4, 2 that leaves this many
ROWS_TARGET_PROGRAMS = 512


@dataclass(frozen=True)
class GemvConfig:
    """One launch shape: ``block_n`` output columns a program, ``block_k`` K rows a loop trip,
    ``split`` programs sharing each column slice's K, ``use_dot``: ``tl.dot`` on ``block_m`` padded
    token rows (16, 32 or 64; else a multiply-and-sum on ``next_power_of_2(M)`` rows, at most 16).
    Every block of token rows reads the weights once, so 32 rows in blocks of 16 read them twice.
    ``num_stages``: loop trips whose loads are in flight at once (Triton's software pipelining)."""

    block_n: int = 128
    block_k: int = 64
    split: int = 1
    num_warps: int = 4
    use_dot: bool = False
    block_m: int = 16
    num_stages: int = 3

    def k_per_split(self, K: int) -> int:
        """K rows of one split, a multiple of ``block_k``."""
        return triton.cdiv(triton.cdiv(K, self.split), self.block_k) * self.block_k

    def num_splits(self, K: int) -> int:
        """Splits actually launched (rounding ``k_per_split`` up can leave fewer than ``split``)."""
        return triton.cdiv(K, self.k_per_split(K))


@dataclass(frozen=True)
class RowsConfig:
    """A launch of the row kernel, for K-contiguous weights: ``block_n`` whole weight rows a
    program (or their ``1/split`` share of K), each the dot product with the token rows; one trip,
    so every program loads all its weights at once, before it waits for the kernel ahead."""

    block_n: int = 4
    split: int = 1
    num_warps: int = 4
    use_dot: bool = False     # tl.dot on tiles of 16-64 token rows (any M; block_n >= 16)

    def k_per_split(self, K: int) -> int:
        """K columns of one split, a multiple of 16."""
        return triton.cdiv(triton.cdiv(K, self.split), 16) * 16

    def num_splits(self, K: int) -> int:
        return triton.cdiv(K, self.k_per_split(K))


def _dot_rows(block_n: int, split: int, num_warps: int) -> RowsConfig:
    return RowsConfig(block_n=block_n, split=split, num_warps=num_warps, use_dot=True)


#: the LM head's width in the engine: GPT-2's 50,257 tokens padded to a multiple of 64
#: (fused_forward.padded_vocab, which the tests check this against)
GPT2_HEAD = 50304
#: measured choices for K-contiguous weights (the engine's layout) at 3-64 rows, (K, N,
#: k_contiguous, M measured) -> config, or None where cuBLAS was fastest; up to ROWS_MAX_M rows the
#: row kernel runs without this table. From benchmarks/probe_gemv_rows.py's rows_dot part on an
#: H200 (torch 2.11, triton 3.6; ``..._probe_gemv_rows_dot.json``, ``..._dot_32.json``,
#: ``..._dot_head.json``): the fastest of cuBLAS, the tile kernel and the row kernel on the tensor
#: cores over block sizes and splits, each checked against an fp32 product first. The row kernel
#: took every GPT-2 124M projection (3.1-4.7 us against cuBLAS's 4.3-8.0) and XL's 1600 -> 1600
#: (4.0-4.5 against 5.6-6.6); cuBLAS kept XL's wide ones (7.0-11.2 us; the row kernel's whole-row
#: tiles spill at 32 rows) but for 6400 -> 1600 at 32 rows, where the tile kernel in one 32-row
#: block took 9.4-9.6 us against 11.3-11.8 (9.5 against 11.5 at 64 rows in one 64-row block); at
#: the heads' padded width cuBLAS is within 1-2 us of the tile kernel (23.7 against 24.7-25.3 us at
#: 124M, 44.0 against 44.6-45.6 at XL) and ahead from 32 rows. At 64 rows the row kernel keeps
#: GPT-2 124M's projections (3.4-5.1 us against cuBLAS's 4.3-8.2). A step of M rows takes the
#: entry of the smallest measured M >= its rows; shapes not here use :func:`default_config` up to
#: DEFAULT_MAX_ROWS rows, then cuBLAS.
MEASURED: dict[tuple[int, int, bool, int], GemvConfig | RowsConfig | None] = {
    # GPT-2 124M
    (768, 2304, True, 4): _dot_rows(32, 1, 4),
    (768, 2304, True, 8): _dot_rows(32, 1, 4),
    (768, 2304, True, 16): _dot_rows(32, 1, 4),
    (768, 2304, True, 32): _dot_rows(32, 1, 8),
    (768, 2304, True, 64): _dot_rows(32, 1, 4),
    (768, 768, True, 4): _dot_rows(16, 1, 8),
    (768, 768, True, 8): _dot_rows(32, 1, 4),
    (768, 768, True, 16): _dot_rows(16, 1, 8),
    (768, 768, True, 32): _dot_rows(16, 1, 8),
    (768, 768, True, 64): _dot_rows(32, 1, 4),
    (768, 3072, True, 4): _dot_rows(32, 1, 4),
    (768, 3072, True, 8): _dot_rows(32, 1, 4),
    (768, 3072, True, 16): _dot_rows(32, 1, 4),
    (768, 3072, True, 32): _dot_rows(32, 1, 8),
    (768, 3072, True, 64): _dot_rows(32, 1, 4),
    (3072, 768, True, 4): _dot_rows(32, 4, 4),
    (3072, 768, True, 8): _dot_rows(32, 4, 4),
    (3072, 768, True, 16): _dot_rows(32, 4, 4),
    (3072, 768, True, 32): _dot_rows(32, 4, 8),
    (3072, 768, True, 64): _dot_rows(32, 4, 4),
    (768, GPT2_HEAD, True, 16): GemvConfig(block_n=256, block_k=64, split=1, num_warps=8, use_dot=True),
    (768, GPT2_HEAD, True, 32): None,
    # GPT-2 XL
    (1600, 4800, True, 32): None,
    (1600, 1600, True, 4): _dot_rows(32, 4, 4),
    (1600, 1600, True, 8): _dot_rows(32, 4, 4),
    (1600, 1600, True, 16): _dot_rows(32, 4, 4),
    (1600, 1600, True, 32): _dot_rows(32, 4, 8),
    (1600, 6400, True, 32): None,
    (6400, 1600, True, 8): GemvConfig(block_n=64, block_k=128, split=11, num_warps=4, use_dot=True),
    (6400, 1600, True, 16): None,
    (6400, 1600, True, 32): GemvConfig(block_n=64, block_k=128, split=5, num_warps=4, use_dot=True, block_m=32,
                                       num_stages=4),
    (6400, 1600, True, 64): GemvConfig(block_n=64, block_k=128, split=5, num_warps=4, use_dot=True, block_m=64,
                                       num_stages=4),
    (1600, GPT2_HEAD, True, 16): GemvConfig(block_n=256, block_k=64, split=1, num_warps=8, use_dot=True),
    (1600, GPT2_HEAD, True, 32): None,
}


def rows_bucket(M: int) -> int:
    return 1 if M <= 1 else triton.next_power_of_2(M)


def default_config(M: int, K: int, N: int, k_contiguous: bool) -> GemvConfig:
    """The tile kernel's rule for shapes the table lacks: enough programs to cover every SM twice,
    each with at least ``MIN_K_PER_SPLIT`` K rows; K-contiguous weights read longer K runs."""
    block_n, block_k = (64, 128) if k_contiguous else (128, 64)
    use_dot = M > 1
    n_blocks = triton.cdiv(N, block_n)
    split = max(1, min(triton.cdiv(TARGET_PROGRAMS, n_blocks), K // MIN_K_PER_SPLIT))
    return GemvConfig(block_n=block_n, block_k=block_k, split=split, num_warps=4, use_dot=use_dot)


def rows_config(K: int, N: int) -> RowsConfig:
    """The row kernel's launch for ``(K, N)``: one split, 4 warps, the widest ``block_n`` of 8, 4, 2
    that leaves :data:`ROWS_TARGET_PROGRAMS` programs. Swept on an H200 at one row
    (benchmarks/probe_gemv_rows.py: 2-32 columns, 1-8 splits, 4 or 8 warps), this rule is within
    5 % of the best config on every GPT-2 124M and XL product, LM heads included. Under the Triton
    interpreter (CPU), where every program is a Python call, 64 columns a program."""
    if _interpreting():
        return RowsConfig(block_n=64, split=1, num_warps=4)
    block_n = next((b for b in (8, 4) if triton.cdiv(N, b) >= ROWS_TARGET_PROGRAMS), 2)
    return RowsConfig(block_n=block_n, split=1, num_warps=4)


def plan_gemv(M: int, K: int, N: int, k_contiguous: bool = False) -> GemvConfig | RowsConfig | None:
    """The kernel for ``(M, K) @ (K, N)``: a :class:`RowsConfig` or :class:`GemvConfig`, or
    ``None`` for cuBLAS. Decided from the shape only (once per captured token bucket), never from
    the data. ``k_contiguous``: ``W.T`` is row-major (the engine's projections and LM head)."""
    if M > GEMV_MAX_ROWS:
        return None
    if k_contiguous and M <= ROWS_MAX_M:
        return rows_config(K, N)
    measured = [m for (k, n, c, m) in MEASURED if (k, n, c) == (K, N, k_contiguous) and m >= M]
    if measured:
        return MEASURED[(K, N, k_contiguous, min(measured))]
    if M > DEFAULT_MAX_ROWS:
        return None
    return default_config(M, K, N, k_contiguous)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gelu_tanh(y):
    # GPT-2's 0.5 y (1 + tanh(u)), u = sqrt(2/pi) (y + 0.044715 y^3), written as y * sigmoid(2u)
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    return y / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _gemv_accumulate(acc, x, w, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """``acc += x (BLOCK_M, BLOCK_K) @ w (BLOCK_K, BLOCK_N)``, fp32."""
    if USE_DOT:
        if DOT_FP32:
            if IEEE:
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(x, w)
    else:
        acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def _load_w(w_ptr, k, K, rn, n_ok, stride_wk, stride_wn):
    """The weight tile ``w[k, cols]`` (BLOCK_K, BLOCK_N)."""
    return tl.load(w_ptr + k[:, None] * stride_wk + rn[None, :] * stride_wn,
                   mask=(k < K)[:, None] & n_ok[None, :], other=0.0)


@triton.jit
def _load_x(x_ptr, rm, m_ok, k, K, stride_xm):
    """The activation tile ``x[rows, k]`` (BLOCK_M, BLOCK_K)."""
    return tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, k_per_split,
                 stride_xm, stride_wk, stride_wn, stride_om, stride_os,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, GELU: tl.constexpr, PARTIAL: tl.constexpr, WHILE_LOOP: tl.constexpr,
                 USE_PDL: tl.constexpr):
    pdl_launch_next(USE_PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    k_lo = pid_s * k_per_split
    # the first weight tile does not depend on the kernel ahead: with PDL it streams in while that
    # kernel finishes (a split of one trip — k_per_split == BLOCK_K — loads all its weights here)
    w = _load_w(w_ptr, k_lo + rk, K, rn, n_ok, stride_wk, stride_wn)
    pdl_wait(USE_PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _gemv_accumulate(acc, _load_x(x_ptr, rm, m_ok, k_lo + rk, K, stride_xm), w, USE_DOT, DOT_FP32, IEEE)
    if WHILE_LOOP:        # the interpreter cannot range() over an argument; compiled code can (and pipelines it)
        k0 = BLOCK_K
        while k0 < k_per_split:
            k = k_lo + k0 + rk
            acc = _gemv_accumulate(acc, _load_x(x_ptr, rm, m_ok, k, K, stride_xm),
                                   _load_w(w_ptr, k, K, rn, n_ok, stride_wk, stride_wn), USE_DOT, DOT_FP32, IEEE)
            k0 += BLOCK_K
    else:
        for k0 in range(BLOCK_K, k_per_split, BLOCK_K):
            k = k_lo + k0 + rk
            acc = _gemv_accumulate(acc, _load_x(x_ptr, rm, m_ok, k, K, stride_xm),
                                   _load_w(w_ptr, k, K, rn, n_ok, stride_wk, stride_wn), USE_DOT, DOT_FP32, IEEE)
    ok = m_ok[:, None] & n_ok[None, :]
    if PARTIAL:                     # fp32 partial of this split: (split, M, N), summed by the consumer
        tl.store(out_ptr + pid_s * stride_os + rm[:, None] * stride_om + rn[None, :], acc, mask=ok)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GELU:
            acc = _gelu_tanh(acc)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_ps, stride_pm, stride_om,
                          SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                          USE_PDL: tl.constexpr):
    pdl_launch_next(USE_PDL)
    pdl_wait(USE_PDL)
    m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rn < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * stride_ps + m * stride_pm + rn, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=ok, other=0.0).to(tl.float32)
    if GELU:
        acc = _gelu_tanh(acc)
    tl.store(out_ptr + m * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _layernorm(x, ok, D, w, b, eps):
    """LayerNorm of one row ``x`` (BLOCK,) over its ``D`` columns marked by ``ok``, with weight and
    bias ``w``, ``b`` (BLOCK,), all fp32 (the formula of every fused kernel; triton_fused.py too)."""
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(ok, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / D
    return centred * (1.0 / tl.sqrt(var + eps)) * w + b


@triton.jit
def _rows_epilogue(y, rm, m_ok, rn, n_ok, bias, out_ptr, stride_om, res_ptr, stride_rm, slots_ptr, k_pool_ptr,
                   v_pool_ptr, kv_start, kv_row, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                   RESIDUAL: tl.constexpr, KV_WRITE: tl.constexpr):
    """Finish ``y`` (BLOCK_M, BLOCK_N), the products of token rows ``rm`` with weight rows ``rn``:
    bias, GELU, the residual added, stored in the output's dtype; the key and value columns also
    stored into their slots of the paged pool."""
    ok = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        y += bias[None, :]
    if GELU:
        y = _gelu_tanh(y)
    if RESIDUAL:            # the residual stream plus the projection, one rounding (as add_layernorm does)
        y = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=ok, other=0.0).to(tl.float32) + y
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y, mask=ok)
    if KV_WRITE:            # columns [kv_start, kv_start + kv_row) are the key, the next kv_row the value
        slot = tl.load(slots_ptr + rm, mask=m_ok, other=0).to(tl.int64)
        col = rn - kv_start
        is_k = (col >= 0) & (col < kv_row)
        is_v = (col >= kv_row) & (col < 2 * kv_row)
        at = slot[:, None] * kv_row + tl.where(is_v, col - kv_row, col)[None, :]
        tl.store(k_pool_ptr + at, y, mask=ok & is_k[None, :])
        tl.store(v_pool_ptr + at, y, mask=ok & is_v[None, :])


@triton.jit
def _gemv_rows_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, k_per_split,
                      stride_xm, stride_wn, stride_om, stride_os,
                      ln_w_ptr, ln_b_ptr, eps, res_ptr, stride_rm, slots_ptr, k_pool_ptr, v_pool_ptr, kv_start, kv_row,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
                      HAS_BIAS: tl.constexpr, GELU: tl.constexpr, PARTIAL: tl.constexpr,
                      LN: tl.constexpr, RESIDUAL: tl.constexpr, KV_WRITE: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_launch_next(USE_PDL)
    pid_s = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k = pid_s * k_per_split + rk
    n_ok = rn < N
    k_ok = (rk < k_per_split) & (k < K)
    # (BLOCK_N, BLOCK_K): every weight this program needs, contiguous along K, loaded before the
    # wait — with PDL they stream in while the kernel ahead finishes; read once a step: evict first
    w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                other=0.0, eviction_policy="evict_first")
    bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    if LN:                  # one split: this program sees all K columns of x, enough for its LayerNorm
        ln_w = tl.load(ln_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        ln_b = tl.load(ln_b_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    pdl_wait(USE_PDL)
    if USE_DOT:         # a tile of BLOCK_M token rows against the weight rows, on the tensor cores
        rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_FP32:
            if IEEE:
                y = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                y = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
        else:
            y = tl.dot(x, tl.trans(w))                                                          # (BLOCK_M, BLOCK_N)
        if PARTIAL:
            tl.store(out_ptr + pid_s * stride_os + rm[:, None] * stride_om + rn[None, :], y,
                     mask=m_ok[:, None] & n_ok[None, :])
        else:
            _rows_epilogue(y, rm, m_ok, rn, n_ok, bias, out_ptr, stride_om, res_ptr, stride_rm, slots_ptr,
                           k_pool_ptr, v_pool_ptr, kv_start, kv_row, HAS_BIAS, GELU, RESIDUAL, KV_WRITE)
    else:               # one or two rows: a multiply-and-sum each on the CUDA cores
        w = w.to(tl.float32)
        for m in tl.static_range(BLOCK_M):
            row_ok = m < M
            x = tl.load(x_ptr + m * stride_xm + k, mask=k_ok & row_ok, other=0.0).to(tl.float32)    # (BLOCK_K,)
            if LN:      # rounded to the activations' dtype, as the LayerNorm's own output would be
                x = _layernorm(x, k_ok, K, ln_w, ln_b, eps).to(x_ptr.dtype.element_ty).to(tl.float32)
            y = tl.sum(w * x[None, :], axis=1)                                                       # (BLOCK_N,)
            if PARTIAL:
                tl.store(out_ptr + pid_s * stride_os + m * stride_om + rn, y, mask=n_ok & row_ok)
            else:
                rm = tl.full((1,), m, tl.int32)                                                      # (1,)
                _rows_epilogue(y[None, :], rm, rm < M, rn, n_ok, bias, out_ptr, stride_om, res_ptr, stride_rm,
                               slots_ptr, k_pool_ptr, v_pool_ptr, kv_start, kv_row, HAS_BIAS, GELU, RESIDUAL,
                               KV_WRITE)


@dataclass(frozen=True)
class KVWrite:
    """Where the row kernel also stores a fused QKV product's keys and values: output columns
    ``[start, start + row)`` are the key of each token row, the next ``row`` its value, written to
    slot ``slot_mapping[m]`` of the pools (contiguous ``(blocks, block_size, H, Dh)``, ``row = H * Dh``)."""

    k_pool: torch.Tensor
    v_pool: torch.Tensor
    slot_mapping: torch.Tensor
    start: int

    @property
    def row(self) -> int:
        """Values of one token's key (``H * Dh``)."""
        return self.k_pool[0, 0].numel()


def _launch_rows(x, w, bias, out, config: RowsConfig, gelu: bool, partial: bool, ln=None, residual=None,
                 kv_write: KVWrite | None = None) -> None:
    M, K, N = x.shape[0], x.shape[1], w.shape[1]
    if w.stride(0) != 1 or (not config.use_dot and M > ROWS_MAX_M) or (config.use_dot and config.block_n < 16):
        raise InputError(f"the row GEMV takes K-contiguous weights (w.stride(0) == 1), at most {ROWS_MAX_M} rows "
                         f"without tensor cores and 16 or more columns a program with them; got {M} rows, "
                         f"w strides {w.stride()}, {config}")
    # ln, residual and kv_write come from gemv_fused only, which has checked the config is one split
    if ln is not None and config.use_dot:
        raise InputError("ln is taken by the one- or two-row kernel only (use_dot=False); run add_layernorm first")
    if residual is not None and (residual.shape != (M, N) or residual.stride(1) != 1):
        raise InputError(f"residual must be ({M}, {N}) with contiguous rows, got {tuple(residual.shape)}")
    kv = kv_write
    if kv is not None:
        if (not (kv.k_pool.is_contiguous() and kv.v_pool.is_contiguous()) or kv.k_pool.shape != kv.v_pool.shape
                or kv.start + 2 * kv.row > N or kv.slot_mapping.shape != (M,)):
            raise InputError(f"kv_write needs two contiguous pools of one shape, a slot per token row ({M}) and "
                             f"key and value columns inside the {N} outputs; got start {kv.start}, rows of {kv.row}")
    interp = _interpreting()
    pdl = pdl_enabled(x.device)
    fp32 = x.dtype == torch.float32 or w.dtype == torch.float32
    kps = config.k_per_split(K)
    block_m = min(max(16, triton.next_power_of_2(max(M, 1))), 64) if config.use_dot else triton.next_power_of_2(max(M, 1))
    grid = (triton.cdiv(N, config.block_n), config.num_splits(K), triton.cdiv(M, block_m))
    _gemv_rows_kernel[grid](
        x, w, bias if bias is not None else w, out, M, N, K, kps,
        x.stride(0), w.stride(1), out.stride(-2), out.stride(0) if partial else 0,
        ln.weight if ln is not None else w, ln.bias if ln is not None else w, ln.eps if ln is not None else 0.0,
        residual if residual is not None else out, residual.stride(0) if residual is not None else 0,
        kv.slot_mapping if kv else w, kv.k_pool if kv else out, kv.v_pool if kv else out,
        kv.start if kv else 0, kv.row if kv else 0,
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=max(16, triton.next_power_of_2(kps)),
        USE_DOT=config.use_dot, DOT_FP32=fp32 or interp, IEEE=fp32 and not interp,
        HAS_BIAS=bias is not None and not partial, GELU=gelu, PARTIAL=partial,
        LN=ln is not None, RESIDUAL=residual is not None, KV_WRITE=kv is not None, USE_PDL=pdl,
        num_warps=config.num_warps, launch_pdl=pdl)


def _check(x: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int]:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[0]:
        raise InputError(f"gemv needs x (M, K) and w (K, N); got x {tuple(x.shape)} and w {tuple(w.shape)}")
    if x.stride(1) != 1:
        raise InputError("gemv needs x's rows contiguous (x.stride(1) == 1); pass x.contiguous()")
    return x.shape[0], x.shape[1], w.shape[1]


def _launch(x, w, bias, out, config, gelu: bool, partial: bool) -> None:
    if isinstance(config, RowsConfig):
        return _launch_rows(x, w, bias, out, config, gelu, partial)
    M, K, N = x.shape[0], x.shape[1], w.shape[1]
    interp = _interpreting()
    pdl = pdl_enabled(x.device)
    fp32 = x.dtype == torch.float32 or w.dtype == torch.float32
    if config.use_dot and config.block_m not in (16, 32, 64):
        raise InputError(f"GemvConfig.block_m must be 16, 32 or 64 on the tensor-core path, got {config.block_m}")
    block_m = config.block_m if config.use_dot else min(triton.next_power_of_2(max(M, 1)), 16)
    grid = (triton.cdiv(N, config.block_n), config.num_splits(K), triton.cdiv(M, block_m))
    _gemv_kernel[grid](
        x, w, bias if bias is not None else w, out, M, N, K, config.k_per_split(K),
        x.stride(0), w.stride(0), w.stride(1), out.stride(-2), out.stride(0) if partial else 0,
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        USE_DOT=config.use_dot, DOT_FP32=fp32 or interp, IEEE=fp32 and not interp,
        HAS_BIAS=bias is not None, GELU=gelu, PARTIAL=partial, WHILE_LOOP=interp,
        USE_PDL=pdl, num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl)


def gemv_partials(x: torch.Tensor, w: torch.Tensor, config: "GemvConfig | RowsConfig") -> torch.Tensor:
    """The split-K partial products of ``x (M, K) @ w (K, N)``: fp32 ``(splits, M, N)`` whose sum
    over the first axis is the product (no bias). One launch."""
    M, K, N = _check(x, w)
    out = torch.empty(config.num_splits(K), M, N, dtype=torch.float32, device=x.device)
    if M:
        _launch(x, w, None, out, config, gelu=False, partial=True)
    return out


def splitk_reduce(partials: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
                  out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``sum(partials, 0) (+ bias) (then GELU)`` as ``(M, N)`` in ``dtype`` (or ``out``'s). One launch."""
    S, M, N = partials.shape
    if out is None:
        out = torch.empty(M, N, dtype=dtype or partials.dtype, device=partials.device)
    if M:
        block_n = 1024
        pdl = pdl_enabled(partials.device)
        _splitk_reduce_kernel[(M, triton.cdiv(N, block_n))](
            partials, bias if bias is not None else partials, out, M, N,
            partials.stride(0), partials.stride(1), out.stride(0), SPLIT=S,
            BLOCK_N=block_n, HAS_BIAS=bias is not None, GELU=gelu, USE_PDL=pdl, launch_pdl=pdl)
    return out


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
         out: torch.Tensor | None = None, config: "GemvConfig | RowsConfig | None" = None) -> torch.Tensor:
    """``x (M, K) @ w (K, N) (+ bias) (then tanh-GELU)`` → ``(M, N)`` in ``x``'s dtype (or into
    ``out``, rows contiguous), fp32 accumulation. One launch with ``split == 1``, two otherwise
    (partials, then :func:`splitk_reduce`). ``config``: by default :func:`plan_gemv`'s choice, or
    :func:`default_config`'s where that would be cuBLAS."""
    M, K, N = _check(x, w)
    if config is None:
        kc = w.stride(0) == 1
        config = plan_gemv(M, K, N, kc) or default_config(M, K, N, kc)
    out = _output(out, M, N, x)
    if M == 0:
        return out
    if config.num_splits(K) == 1:
        _launch(x, w, bias, out, config, gelu=gelu, partial=False)
        return out
    return splitk_reduce(gemv_partials(x, w, config), bias, gelu, out=out)


def fusable(config: "GemvConfig | RowsConfig | None", K: int) -> bool:
    """Whether :func:`gemv_fused` can run ``config`` for ``K`` inputs: the row kernel in one split."""
    return isinstance(config, RowsConfig) and config.num_splits(K) == 1


def gemv_fused(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, config: RowsConfig,
               ln: torch.nn.LayerNorm | None = None, gelu: bool = False, residual: torch.Tensor | None = None,
               kv_write: KVWrite | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The row kernel with its neighbours folded in, one launch: ``out = residual + act(ln(x) @ w + bias)``
    where each part is optional — ``ln``: the LayerNorm of each input row first (every program
    computes it from the whole row: K fits one split; one or two rows, ``use_dot=False``);
    ``gelu``: tanh-GELU; ``residual`` (M, N): added
    (the residual stream's update, one rounding); ``kv_write``: the key and value columns also stored
    in the paged pool (:class:`KVWrite`). ``config`` must satisfy :func:`fusable`."""
    M, K, N = _check(x, w)
    if not fusable(config, K):
        raise InputError(f"gemv_fused runs the row kernel in one split; {config} does not for K = {K}")
    out = _output(out, M, N, x)
    if M:
        _launch_rows(x, w, bias, out, config, gelu, False, ln=ln, residual=residual, kv_write=kv_write)
    return out


def _output(out: torch.Tensor | None, M: int, N: int, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(M, N, dtype=x.dtype, device=x.device)
    if out.shape != (M, N) or out.stride(1) != 1:
        raise InputError(f"out must be ({M}, {N}) with contiguous rows, got {tuple(out.shape)}")
    return out
