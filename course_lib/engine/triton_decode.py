"""Paged decode attention as a Triton kernel (the engine's fast GPU path for decode rows).

One program per (sequence, head). It walks the sequence's context ``BLOCK_N`` tokens at a time:
token ``t`` is found through the block table at slot ``block_table[t // block_size] *
block_size + t % block_size``, so the keys of one request need not be contiguous. Scores,
softmax and the weighted sum of values are fused with the online softmax (a running maximum
``m``, a running sum ``l``, a rescaled accumulator), so nothing of size ``context`` is stored.

Runs on CPU through the Triton interpreter when ``TRITON_INTERPRET=1`` is set before this module
is imported (tests/test_engine_triton.py). Introduced in notebooks/12_flash_attention.ipynb.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, scale,
    stride_qb, stride_qh,                  # q: (B, H, Dh)
    stride_kblock, stride_kslot, stride_kh,  # k, v: (blocks, block_size, H, Dh), same strides
    stride_tb,                             # block tables: (B, M)
    stride_ob, stride_oh,                  # out: (B, H, Dh)
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context = tl.load(lens_ptr + seq)
    d = tl.arange(0, HEAD_DIM_P2)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qb + head * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)

    m = tl.full((), float("-inf"), tl.float32)     # running max of the scores
    l = tl.full((), 0.0, tl.float32)               # running sum of exp(score - m)
    acc = tl.zeros((HEAD_DIM_P2,), tl.float32)     # running sum of exp(score - m) * v
    start = tl.full((), 0, tl.int32)
    while start < context:                         # (a while loop: the interpreter cannot range() over a loaded value)
        t = start + tl.arange(0, BLOCK_N)          # token positions of this tile
        t_ok = t < context
        block = tl.load(tables_ptr + seq * stride_tb + t // BLOCK_SIZE, mask=t_ok, other=0)
        row = block.to(tl.int64) * stride_kblock + (t % BLOCK_SIZE) * stride_kslot + head * stride_kh
        kv_ok = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=kv_ok, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale                     # (BLOCK_N,)
        s = tl.where(t_ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=kv_ok, other=0.0).to(tl.float32)
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
        start += BLOCK_N
    out = acc / tl.maximum(l, 1e-30)               # context 0 (a padded row): zeros, not NaN
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           block_n: int | None = None) -> torch.Tensor:
    """``q`` (B, H, Dh) against each sequence's ``context_lens[b]`` cached tokens → (B, H, Dh).

    ``k_cache``/``v_cache`` are one layer of the pool, ``(blocks, block_size, H, Dh)``;
    ``block_tables`` is ``(B, M)`` (int32 or int64). No host synchronisation: safe inside a CUDA graph.
    With few (sequence, head) programs (small batches) each takes bigger tiles, so fewer loop
    trips wait on memory.
    """
    B, H, Dh = q.shape
    if block_n is None:
        block_n = 128 if B * H <= 512 else 64
    if k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("paged_decode_attention needs the head dimension contiguous")
    out = torch.empty_like(q)
    _paged_decode_kernel[(B, H)](
        q, k_cache, v_cache, block_tables, context_lens, out, 1.0 / math.sqrt(Dh),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        HEAD_DIM=Dh, HEAD_DIM_P2=triton.next_power_of_2(Dh), BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n,
        num_warps=8 if block_n >= 128 else 4,
    )
    return out
