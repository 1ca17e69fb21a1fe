"""An experiment, not the engine: decode attention with every head of a (sequence, key chunk) in one program.

The engine's unified kernel (course_lib/engine/triton_unified.py) runs one program per (tile, head,
key chunk). A decode tile is one query row, so at batch 64 with GPT-2 124M's 12 heads each program
walks one head's keys alone: in every block of the paged pool ``(blocks, block_size, H, Dh)`` it
reads 16 slots of 128 bytes that lie ``H * Dh * 2`` bytes apart, and it pays its own start-up (tile
table, block table, the first trip's latency) for one head's share of the bytes. Over the serving
workload's mixed contexts it streams at 2.7-3.1 TB/s of the H200's 4.2 (benchmarks/NOTES.md,
session 10).

Here one program takes *all* heads of one sequence's key chunk: a block's slots are read whole,
``H * Dh`` contiguous elements each (1.5 KB at 124M, 3.2 KB at XL), and the start-up is paid once
for all heads. Scores are a multiply-and-sum over the head dimension on the CUDA cores (one query
row: nothing for the tensor cores to do). Chunks have a fixed length ``chunk_keys`` for every
sequence, so a long context gets more programs than a short one and every program has about the
same work: grid ``(num_seqs * max_chunks,)``, program ``p`` is chunk ``p % max_chunks`` of sequence
``p // max_chunks``; chunks past a sequence's keys exit at once. Each live chunk stores its
unnormalised ``(m, l, acc)`` per head; the last to arrive (an atomic counter per sequence) merges
them exactly, as the unified kernel's split path does.

Decode rows only (one query row per sequence, at the sequence's last position), no causal mask
needed. ``benchmarks/bench_attention.py --skip ... ,all_heads`` times it against the unified kernel;
``tests/test_attention_all_heads.py`` checks it against a plain softmax through the interpreter.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


@triton.jit
def _fold_trip(q, m, l, acc, start, hi, seq, hd, h_ok, k_ptr, v_ptr, tables_ptr, stride_kblock, stride_kslot,
               stride_tb, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys ``start .. start + BLOCK_N - 1`` (those below ``hi``) of every head folded into the running
    (m, l, acc): one whole slot of the pool per key, all heads side by side."""
    t = start + tl.arange(0, BLOCK_N)             # (BLOCK_N,)
    t_ok = t < hi
    block = tl.load(tables_ptr + seq.to(tl.int64) * stride_tb + t // BLOCK_SIZE, mask=t_ok, other=0)
    slot = block.to(tl.int64) * stride_kblock + (t % BLOCK_SIZE) * stride_kslot              # (BLOCK_N,)
    at = slot[:, None, None] + hd[None, :, :]                                                 # (BLOCK_N, HP, DH)
    ok = t_ok[:, None, None] & h_ok[None, :, None]
    k = tl.load(k_ptr + at, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + at, mask=ok, other=0.0).to(tl.float32)
    s = tl.sum(k * q[None, :, :], axis=2)                                                     # (BLOCK_N, HP)
    s = tl.where(t_ok[:, None], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=0))      # every trip holds at least one key: never -inf
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[None, :])                                                           # (BLOCK_N, HP)
    l = l * alpha + tl.sum(p, axis=0)
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, axis=0)                            # (HP, DH)
    return m_new, l, acc


@triton.jit
def _all_heads_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_ml_ptr, part_acc_ptr, arrived_ptr,
                             tables_ptr, context_lens_ptr, num_seqs, chunk_keys, qk_scale,
                             stride_qn, stride_kblock, stride_kslot, stride_on, stride_tb,
                             H: tl.constexpr, HP: tl.constexpr, DH: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             BLOCK_N: tl.constexpr, MAX_CHUNKS: tl.constexpr, WHILE_LOOP: tl.constexpr):
    pid = tl.program_id(0)
    seq = pid // MAX_CHUNKS
    chunk = pid % MAX_CHUNKS
    if seq >= num_seqs:
        return
    context = tl.load(context_lens_ptr + seq).to(tl.int32)
    lo = chunk * chunk_keys
    if lo >= context:                             # a chunk past this sequence's keys
        return
    hi = tl.minimum(lo + chunk_keys, context)
    h = tl.arange(0, HP)                          # (HP,) heads, padded to a power of two
    d = tl.arange(0, DH)                          # (DH,)
    h_ok = h < H
    hd = h[:, None] * DH + d[None, :]             # (HP, DH) offsets inside one slot: heads side by side
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qn + hd, mask=h_ok[:, None], other=0.0).to(tl.float32)
    q = q * qk_scale                              # (HP, DH), scores come out in log2 units
    m = tl.full((HP,), float("-inf"), tl.float32)
    l = tl.zeros((HP,), tl.float32)
    acc = tl.zeros((HP, DH), tl.float32)
    if WHILE_LOOP:        # the interpreter cannot range() over a loaded value; compiled code can (and pipelines it)
        start = lo
        while start < hi:
            m, l, acc = _fold_trip(q, m, l, acc, start, hi, seq, hd, h_ok, k_ptr, v_ptr, tables_ptr,
                                   stride_kblock, stride_kslot, stride_tb, BLOCK_SIZE, BLOCK_N)
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            m, l, acc = _fold_trip(q, m, l, acc, start, hi, seq, hd, h_ok, k_ptr, v_ptr, tables_ptr,
                                   stride_kblock, stride_kslot, stride_tb, BLOCK_SIZE, BLOCK_N)
    live = tl.cdiv(context, chunk_keys)
    if live == 1:                                 # the whole context in this one chunk
        out = acc / tl.where(h_ok, l, 1.0)[:, None]
        tl.store(out_ptr + seq.to(tl.int64) * stride_on + hd, out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None])
    else:
        base = (seq * MAX_CHUNKS + chunk).to(tl.int64)
        tl.store(part_ml_ptr + base * 2 * HP + h, m)
        tl.store(part_ml_ptr + base * 2 * HP + HP + h, l)
        tl.store(part_acc_ptr + base * HP * DH + h[:, None] * DH + d[None, :], acc)
        tl.debug_barrier()
        if tl.atomic_add(arrived_ptr + seq, 1, sem="acq_rel") == live - 1:
            tl.store(arrived_ptr + seq, 0)        # ready for the next launch
            first = (seq * MAX_CHUNKS).to(tl.int64)
            m_max = tl.full((HP,), float("-inf"), tl.float32)
            c = 0
            while c < live:
                m_max = tl.maximum(m_max, tl.load(part_ml_ptr + (first + c) * 2 * HP + h, cache_modifier=".cg"))
                c += 1
            m_use = tl.where(h_ok, m_max, 0.0)
            l_sum = tl.zeros((HP,), tl.float32)
            total = tl.zeros((HP, DH), tl.float32)
            c = 0
            while c < live:
                w = tl.exp2(tl.load(part_ml_ptr + (first + c) * 2 * HP + h, cache_modifier=".cg") - m_use)
                w = tl.where(h_ok, w, 0.0)
                l_sum += w * tl.load(part_ml_ptr + (first + c) * 2 * HP + HP + h, cache_modifier=".cg")
                total += w[:, None] * tl.load(part_acc_ptr + (first + c) * HP * DH + h[:, None] * DH + d[None, :],
                                              cache_modifier=".cg")
                c += 1
            out = total / tl.where(h_ok, l_sum, 1.0)[:, None]
            tl.store(out_ptr + seq.to(tl.int64) * stride_on + hd, out.to(out_ptr.dtype.element_ty),
                     mask=h_ok[:, None])


def all_heads_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, max_context: int, chunk_keys: int = 256, block_n: int = 16,
                     num_warps: int = 4, num_stages: int = 2, counters: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """One decode row per sequence: ``q`` (B, H, Dh) against its keys in the paged pool
    ``(blocks, block_size, H, Dh)`` (heads contiguous) → (B, H, Dh). ``max_context`` bounds every
    ``context_lens`` entry and fixes the grid (``B * ceil(max_context / chunk_keys)`` programs), so
    the launch shape is static. ``chunk_keys`` is rounded up to whole trips of ``block_n`` keys.
    ``counters``: int32 zeros, at least B, left zero by the launch (one buffer for every layer)."""
    B, H, Dh = q.shape
    if k_cache.stride(-1) != 1 or k_cache.stride(-2) != Dh or q.stride(-1) != 1 or q.stride(-2) != Dh:
        raise ValueError("all_heads_decode needs each slot's heads contiguous: (blocks, block_size, H, Dh) and (B, H, Dh)")
    if Dh & (Dh - 1):
        raise ValueError(f"the head dimension must be a power of two, got {Dh}")
    chunk_keys = -(-chunk_keys // block_n) * block_n
    max_chunks = max(1, -(-max_context // chunk_keys))
    HP = triton.next_power_of_2(H)
    out = torch.empty_like(q) if out is None else out
    part_ml = torch.empty(B * max_chunks * 2 * HP, dtype=torch.float32, device=q.device)
    part_acc = torch.empty(B * max_chunks * HP * Dh, dtype=torch.float32, device=q.device)
    if counters is None:
        counters = torch.zeros(B, dtype=torch.int32, device=q.device)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    extra = {} if interpret else {"num_stages": num_stages}
    _all_heads_decode_kernel[(B * max_chunks,)](
        q, k_cache, v_cache, out, part_ml, part_acc, counters, block_tables, context_lens, B, chunk_keys,
        LOG2_E / math.sqrt(Dh), q.stride(0), k_cache.stride(0), k_cache.stride(1), out.stride(0),
        block_tables.stride(0), H=H, HP=HP, DH=Dh, BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n,
        MAX_CHUNKS=max_chunks, WHILE_LOOP=interpret, num_warps=num_warps, **extra)
    return out
