"""An experiment, not the engine: decode attention with a group of heads of a (sequence, key chunk) in one program.

The engine's unified kernel (course_lib/engine/triton_unified.py) runs one program per (tile, head,
key chunk). A decode tile is one query row, so at batch 64 with GPT-2 124M's 12 heads each program
walks one head's keys alone: in every block of the paged pool ``(blocks, block_size, H, Dh)`` it
reads 16 slots of 128 bytes that lie ``H * Dh * 2`` bytes apart, and it pays its own start-up (tile
table, block table, the first trip's latency) for one head's share of the bytes. Over the serving
workload's mixed contexts it streams at 2.7-3.1 TB/s of the H200's 4.2 (benchmarks/NOTES.md,
session 10).

Here one program takes ``HG`` heads (a power of two, up to all of them) of one sequence's key chunk:
each key's slot is read ``HG * Dh`` contiguous elements at a time (all 12 heads: 1.5 KB at 124M),
and the start-up is paid once for them. Scores are a multiply-and-sum over the head dimension on
the CUDA cores (one query row: nothing for the tensor cores to do). Chunks have a fixed length
``chunk_keys`` for every sequence, so a long context gets more programs than a short one and every
program has about the same work: program ``p`` is head group ``p % groups`` of chunk
``(p // groups) % max_chunks`` of sequence ``p // (groups * max_chunks)``; chunks past a sequence's
keys exit at once. Each live chunk stores its unnormalised ``(m, l, acc)`` per head; the last to
arrive (an atomic counter per sequence and group) merges them exactly, as the unified kernel's split
path does. The more heads a program takes, the more registers its ``(BLOCK_N, HG, Dh)`` tiles need:
compiled for an H200 (sm_90) with 4 warps and 16-key trips, one head takes 56 registers a thread,
four 204, eight spill. Triton's software pipelining takes only loads that feed a ``tl.dot``, so the
kernel issues each trip's loads one trip ahead by hand.

Outcome on an H200 (benchmarks/NOTES.md, session 11): slower than the unified kernel on every call
timed, e.g. 80.5 against 71.3 us a layer call for 64 decodes over contexts in [100, 2048] with
GPT-2 124M's heads; kept as the record, not used by the engine.

Decode rows only (one query row per sequence, at the sequence's last position), no causal mask
needed. ``benchmarks/bench_attention.py``'s ``head_groups`` part times it against the unified
kernel; ``tests/test_attention_head_groups.py`` checks it against a plain softmax through the
interpreter.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


@triton.jit
def _load_trip(start, hi, seq, hd, h_ok, k_ptr, v_ptr, tables_ptr, stride_kblock, stride_kslot, stride_tb,
               BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys and values ``(BLOCK_N, HG, DH)`` of keys ``start .. start + BLOCK_N - 1`` (those below
    ``hi``; none at all past it, so the load of a trip after the last costs no memory traffic):
    the program's heads of one slot of the pool per key, side by side."""
    t = start + tl.arange(0, BLOCK_N)             # (BLOCK_N,)
    t_ok = t < hi
    block = tl.load(tables_ptr + seq.to(tl.int64) * stride_tb + t // BLOCK_SIZE, mask=t_ok, other=0)
    slot = block.to(tl.int64) * stride_kblock + (t % BLOCK_SIZE) * stride_kslot              # (BLOCK_N,)
    at = slot[:, None, None] + hd[None, :, :]                                                 # (BLOCK_N, HG, DH)
    ok = t_ok[:, None, None] & h_ok[None, :, None]
    return tl.load(k_ptr + at, mask=ok, other=0.0), tl.load(v_ptr + at, mask=ok, other=0.0), t_ok


@triton.jit
def _fold_trip(q, m, l, acc, k, v, t_ok):
    """One trip's keys and values folded into the running (m, l, acc) of the program's heads."""
    s = tl.sum(k.to(tl.float32) * q[None, :, :], axis=2)                                      # (BLOCK_N, HG)
    s = tl.where(t_ok[:, None], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=0))      # every trip holds at least one key: never -inf
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[None, :])                                                           # (BLOCK_N, HG)
    l = l * alpha + tl.sum(p, axis=0)
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32), axis=0)             # (HG, DH)
    return m_new, l, acc


@triton.jit
def _head_group_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_ml_ptr, part_acc_ptr, arrived_ptr,
                              tables_ptr, context_lens_ptr, chunk_keys, qk_scale,
                              stride_qn, stride_kblock, stride_kslot, stride_on, stride_tb,
                              H: tl.constexpr, HG: tl.constexpr, GROUPS: tl.constexpr, DH: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MAX_CHUNKS: tl.constexpr,
                              WHILE_LOOP: tl.constexpr):
    pid = tl.program_id(0)                        # the head group fastest, then the chunk, then the sequence
    group = pid % GROUPS
    chunk = (pid // GROUPS) % MAX_CHUNKS
    seq = pid // (GROUPS * MAX_CHUNKS)             # the grid is exactly B * MAX_CHUNKS * GROUPS
    context = tl.load(context_lens_ptr + seq).to(tl.int32)
    lo = chunk * chunk_keys
    if lo >= context:                             # a chunk past this sequence's keys
        return
    hi = tl.minimum(lo + chunk_keys, context)
    h = group * HG + tl.arange(0, HG)             # (HG,) this program's heads; the last group may run past H
    d = tl.arange(0, DH)                          # (DH,)
    h_ok = h < H
    hd = h[:, None] * DH + d[None, :]             # (HG, DH) offsets inside one slot: heads side by side
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qn + hd, mask=h_ok[:, None], other=0.0).to(tl.float32)
    q = q * qk_scale                              # (HG, DH), scores come out in log2 units
    m = tl.full((HG,), float("-inf"), tl.float32)
    l = tl.zeros((HG,), tl.float32)
    acc = tl.zeros((HG, DH), tl.float32)
    # pipelined by hand, one trip ahead: Triton's software pipelining takes only loads that feed a
    # tl.dot, so each trip's loads are issued before the trip before it is folded in
    k, v, t_ok = _load_trip(lo, hi, seq, hd, h_ok, k_ptr, v_ptr, tables_ptr, stride_kblock, stride_kslot,
                            stride_tb, BLOCK_SIZE, BLOCK_N)
    if WHILE_LOOP:        # the interpreter cannot range() over a loaded value; compiled code can
        start = lo
        while start < hi:
            k_next, v_next, ok_next = _load_trip(start + BLOCK_N, hi, seq, hd, h_ok, k_ptr, v_ptr, tables_ptr,
                                                 stride_kblock, stride_kslot, stride_tb, BLOCK_SIZE, BLOCK_N)
            m, l, acc = _fold_trip(q, m, l, acc, k, v, t_ok)
            k, v, t_ok = k_next, v_next, ok_next
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            k_next, v_next, ok_next = _load_trip(start + BLOCK_N, hi, seq, hd, h_ok, k_ptr, v_ptr, tables_ptr,
                                                 stride_kblock, stride_kslot, stride_tb, BLOCK_SIZE, BLOCK_N)
            m, l, acc = _fold_trip(q, m, l, acc, k, v, t_ok)
            k, v, t_ok = k_next, v_next, ok_next
    live = tl.cdiv(context, chunk_keys)
    if live == 1:                                 # the whole context in this one chunk
        out = acc / tl.where(h_ok, l, 1.0)[:, None]
        tl.store(out_ptr + seq.to(tl.int64) * stride_on + hd, out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None])
    else:
        # partials (seq, chunk, GROUPS * HG heads): m and l side by side, acc apart
        HPAD: tl.constexpr = GROUPS * HG
        base = (seq * MAX_CHUNKS + chunk).to(tl.int64)
        tl.store(part_ml_ptr + base * 2 * HPAD + h, m)
        tl.store(part_ml_ptr + base * 2 * HPAD + HPAD + h, l)
        tl.store(part_acc_ptr + base * HPAD * DH + hd, acc)
        tl.debug_barrier()
        counter = arrived_ptr + seq * GROUPS + group
        if tl.atomic_add(counter, 1, sem="acq_rel") == live - 1:
            tl.store(counter, 0)                  # ready for the next launch
            first = (seq * MAX_CHUNKS).to(tl.int64)
            m_max = tl.full((HG,), float("-inf"), tl.float32)
            c = live * 0                          # a tensor: compiled loops cannot carry a constexpr
            while c < live:
                m_max = tl.maximum(m_max, tl.load(part_ml_ptr + (first + c) * 2 * HPAD + h, cache_modifier=".cg"))
                c += 1
            m_use = tl.where(h_ok, m_max, 0.0)
            l_sum = tl.zeros((HG,), tl.float32)
            total = tl.zeros((HG, DH), tl.float32)
            c = live * 0
            while c < live:
                w = tl.exp2(tl.load(part_ml_ptr + (first + c) * 2 * HPAD + h, cache_modifier=".cg") - m_use)
                w = tl.where(h_ok, w, 0.0)
                l_sum += w * tl.load(part_ml_ptr + (first + c) * 2 * HPAD + HPAD + h, cache_modifier=".cg")
                total += w[:, None] * tl.load(part_acc_ptr + (first + c) * HPAD * DH + hd, cache_modifier=".cg")
                c += 1
            out = total / tl.where(h_ok, l_sum, 1.0)[:, None]
            tl.store(out_ptr + seq.to(tl.int64) * stride_on + hd, out.to(out_ptr.dtype.element_ty),
                     mask=h_ok[:, None])


def head_group_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, max_context: int, heads_per_program: int | None = None,
                      chunk_keys: int = 256, block_n: int = 16, num_warps: int = 4, num_stages: int = 2,
                      counters: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One decode row per sequence: ``q`` (B, H, Dh) against its keys in the paged pool
    ``(blocks, block_size, H, Dh)`` (heads contiguous) → (B, H, Dh). ``heads_per_program``: a power of
    two (default: all heads, padded); the heads are cut into ``ceil(H / heads_per_program)`` groups.
    ``max_context`` bounds every ``context_lens`` entry and fixes the grid
    (``B * ceil(max_context / chunk_keys) * groups`` programs), so the launch shape is static.
    ``chunk_keys`` is rounded up to whole trips of ``block_n`` keys. ``counters``: int32 zeros, at
    least ``B * groups``, left zero by the launch (one buffer for every layer)."""
    B, H, Dh = q.shape
    if k_cache.stride(-1) != 1 or k_cache.stride(-2) != Dh or q.stride(-1) != 1 or q.stride(-2) != Dh:
        raise ValueError("head_group_decode needs each slot's heads contiguous: (blocks, block_size, H, Dh) "
                         "and (B, H, Dh)")
    if Dh & (Dh - 1):
        raise ValueError(f"the head dimension must be a power of two, got {Dh}")
    hg = heads_per_program or triton.next_power_of_2(H)
    if hg & (hg - 1) or hg < 1:
        raise ValueError(f"heads_per_program must be a power of two, got {heads_per_program}")
    groups = -(-H // hg)
    chunk_keys = -(-chunk_keys // block_n) * block_n
    max_chunks = max(1, -(-max_context // chunk_keys))
    out = torch.empty_like(q) if out is None else out
    part_ml = torch.empty(B * max_chunks * 2 * groups * hg, dtype=torch.float32, device=q.device)
    part_acc = torch.empty(B * max_chunks * groups * hg * Dh, dtype=torch.float32, device=q.device)
    if counters is None:
        counters = torch.zeros(B * groups, dtype=torch.int32, device=q.device)
    elif counters.numel() < B * groups:
        raise ValueError(f"counters must hold at least B * groups = {B * groups} zeros, got {counters.numel()}")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    extra = {} if interpret else {"num_stages": num_stages}
    _head_group_decode_kernel[(B * max_chunks * groups,)](
        q, k_cache, v_cache, out, part_ml, part_acc, counters, block_tables, context_lens, chunk_keys,
        LOG2_E / math.sqrt(Dh), q.stride(0), k_cache.stride(0), k_cache.stride(1), out.stride(0),
        block_tables.stride(0), H=H, HG=hg, GROUPS=groups, DH=Dh, BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n,
        MAX_CHUNKS=max_chunks, WHILE_LOOP=interpret, num_warps=num_warps, **extra)
    return out
