"""One attention kernel for every row of a step: decodes, fresh prefills, cached prefixes, chunks.

The idea (FlashAttention over a paged cache). The step's new query rows lie end to end, sequence
after sequence (``query_start`` holds where each sequence's rows begin). We cut every sequence's
rows into *tiles* of ``BLOCK_M`` consecutive rows; a tile never spans two sequences, so a decode
row is a tile of its own and a 1000-token prefill is ``ceil(1000 / BLOCK_M)`` tiles. One program
handles one (tile, head) pair:

1. load the tile's queries ``(BLOCK_M, Dh)``; row ``r`` of sequence ``s`` sits at absolute position
   ``pos = context_len[s] - query_len[s] + (r - query_start[s])`` (the cached prefix comes first);
2. walk the keys ``BLOCK_N`` at a time from position 0 up to the tile's *last* position only:
   key blocks past it are masked for every row, so they are never loaded — this is where causal
   attention saves half the work of full attention. Key ``t`` lives in the paged pool at slot
   ``block_table[s, t // block_size] * block_size + t % block_size`` (kv_cache.py's pool layout);
3. scores ``Q Kᵀ`` with ``tl.dot`` (fp32 accumulation), the causal mask by absolute position
   (``t <= pos``; only the blocks that straddle the diagonal need it: keys before the tile's first
   position are visible to all its rows), then the online softmax: a running row maximum ``m``, a running sum ``l`` of
   ``exp(score - m)`` and an accumulator of ``exp(score - m) @ V``, rescaled by ``exp(m_old - m_new)``
   whenever the maximum grows. Nothing of size (rows × keys) is ever stored;
4. divide by ``l`` and store the tile's live rows.

Split-KV (flash-decoding). At batch 1 the grid has one tile per head — 25 programs for GPT-2 XL on
a GPU of 132 SMs — and each walks all the keys alone, so most of the GPU idles while a few programs
wait on memory. With ``num_splits = S > 1`` each (tile, head) gets S programs: program ``(tile, head, s)``
walks only chunk ``s`` of the tile's keys (``chunk = ceil(keys / S)`` rounded up to ``BLOCK_N``;
programs whose chunk starts past the keys do nothing) and stores its *unnormalised* partial
``(m, l, acc)`` in fp32 scratch, then counts itself in with an atomic add on the (tile, head)'s
counter. The program that arrives last merges the chunks of each row exactly, the log-sum-exp way:
``M = max_s m_s``, ``out = Σ_s 2^(m_s - M) acc_s / Σ_s 2^(m_s - M) l_s``, and sets the counter back
to 0 for the next layer. One launch a layer, no second merge kernel: in a decode step each launch
costs a few microseconds of latency, more than the merge's work.
``S`` is picked on the host from the static grid (attention_tiles.kv_splits_for), so it too is
fixed per CUDA-graph bucket.

Why "unified": the launch shape is *static*. The grid is ``max_tiles * H * S`` programs for a given
number of tokens; which tile a program works on comes from a device table (``tile_seq``, ``tile_row``) and
``num_tiles`` (programs past it exit at once). So a CUDA graph captured once per token-count bucket
can replay any mix of sequences: only the tables' contents change from step to step.

Launch order. The grid is flat, and program ``p`` is head ``p % H`` of chunk ``(p // H) % S`` of
tile ``p // (H * S)``: the GPU starts programs roughly in that order, so all heads and chunks of the
first tiles — the ones that read the most keys (build_tiles lists them first) — start first, and
the short tiles fill the SMs in at the end. With the tile fastest (programs ``(tile, head, s)`` in a
3-D grid, as before) the last heads and chunks of the longest tiles started last, and the kernel
waited for them: on an H200, 64 decodes with contexts uniform in [100, 2048] took 78.3 us a layer
call with GPT-2 124M's heads that way and 71.9 us this way, 141.9 -> 114.0 us with XL's; a prefill of
8 x 1,024 tokens with 124M's heads 63.7 -> 53.2 us (benchmarks/bench_attention.py,
results/2026-12-02_nvidia-h200_attention_order_*.json).

Runs on CPU through the Triton interpreter when ``TRITON_INTERPRET=1`` is set before this module is
imported (tests/test_engine_triton.py, tests/test_engine_split_kv.py); the interpreter computes bf16 ``tl.dot`` wrongly, so
interpreted runs multiply in fp32. Introduced in notebooks/12_flash_attention.ipynb.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .pdl import pdl_enabled, pdl_launch_next, pdl_wait
from .attention_tiles import (build_tiles, default_block_n, default_num_stages, kv_splits_for, max_tiles,  # noqa: F401
                              tile_rows_for)  # (the host side)

LOG2_E = 1.4426950408889634          # exp(x) = exp2(x * log2(e)); exp2 is the hardware instruction


@triton.jit
def _attend_key_block(q, m, l, acc, start, key_end, pos, seq, head, d, d_ok, k_ptr, v_ptr, tables_ptr, qk_scale,
                      stride_kblock, stride_kslot, stride_kh, stride_tb,
                      BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                      DOT_FP32: tl.constexpr, IEEE: tl.constexpr, SAFE: tl.constexpr):
    """Keys ``start..start+BLOCK_N-1`` of one sequence folded into the running (m, l, acc) of a tile.
    ``MASKED=False``: every key is visible to every row (all lie before the tile's first position).
    ``SAFE``: a row may have seen no key yet and see none here (a key chunk past its position, split-KV):
    its ``m`` stays ``-inf`` and ``l``, ``acc`` stay 0 instead of turning NaN."""
    t = start + tl.arange(0, BLOCK_N)                     # (BLOCK_N,) key positions
    t_ok = t < key_end
    block = tl.load(tables_ptr + seq.to(tl.int64) * stride_tb + t // BLOCK_SIZE, mask=t_ok, other=0)
    slot = block.to(tl.int64) * stride_kblock + (t % BLOCK_SIZE) * stride_kslot + head * stride_kh
    kv_ok = t_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + slot[:, None] + d[None, :], mask=kv_ok, other=0.0)   # (BLOCK_N, Dh)
    v = tl.load(v_ptr + slot[:, None] + d[None, :], mask=kv_ok, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))                        # (BLOCK_M, BLOCK_N), fp32
    s = s * qk_scale
    if MASKED:                                            # the diagonal: key t counts for rows with pos >= t
        causal = (t[None, :] <= pos[:, None]) & t_ok[None, :]   # key 0 is always visible: no NaN
        s = tl.where(causal, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    if SAFE:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)     # exp2(-inf - 0) = 0, not exp2(NaN)
    else:
        m_use = m_new
    alpha = tl.exp2(m - m_use)                            # rescales what was summed so far
    p = tl.exp2(s - m_use[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc


@triton.jit
def _attend_key_range(q, m, l, acc, lo, hi, key_end, pos, seq, head, d, d_ok, k_ptr, v_ptr, tables_ptr, qk_scale,
                      stride_kblock, stride_kslot, stride_kh, stride_tb,
                      BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                      DOT_FP32: tl.constexpr, IEEE: tl.constexpr, WHILE_LOOP: tl.constexpr, SAFE: tl.constexpr):
    """The key blocks starting at ``lo, lo + BLOCK_N, ...`` below ``hi``, one after the other."""
    if WHILE_LOOP:        # the interpreter cannot range() over a loaded value; compiled code can (and pipelines it)
        start = lo
        while start < hi:
            m, l, acc = _attend_key_block(q, m, l, acc, start, key_end, pos, seq, head, d, d_ok, k_ptr, v_ptr,
                                          tables_ptr, qk_scale, stride_kblock, stride_kslot, stride_kh, stride_tb,
                                          BLOCK_SIZE, BLOCK_N, MASKED, DOT_FP32, IEEE, SAFE)
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            m, l, acc = _attend_key_block(q, m, l, acc, start, key_end, pos, seq, head, d, d_ok, k_ptr, v_ptr,
                                          tables_ptr, qk_scale, stride_kblock, stride_kslot, stride_kh, stride_tb,
                                          BLOCK_SIZE, BLOCK_N, MASKED, DOT_FP32, IEEE, SAFE)
    return m, l, acc


@triton.jit
def _tile_extent(tile, tables_ptr, context_lens_ptr, query_start_ptr, tile_seq_ptr, tile_row_ptr,
                 BLOCK_M: tl.constexpr):
    """Where tile ``tile`` lies: its sequence, its rows, their absolute positions, the keys it needs."""
    # rows and positions fit in int32; only pointer offsets into the pool need int64
    seq = tl.load(tile_seq_ptr + tile).to(tl.int32)
    first = tl.load(tile_row_ptr + tile).to(tl.int32)         # flat row of the tile's first query
    q_start = tl.load(query_start_ptr + seq).to(tl.int32)
    q_end = tl.load(query_start_ptr + seq + 1).to(tl.int32)
    context = tl.load(context_lens_ptr + seq).to(tl.int32)    # keys of this sequence: prefix + new
    prefix = context - (q_end - q_start)                       # keys cached before this step
    rows = first + tl.arange(0, BLOCK_M)                       # (BLOCK_M,) flat query rows
    key_end = prefix + tl.minimum(first + BLOCK_M, q_end) - q_start   # keys 0..key_end-1 matter
    return seq, first, q_start, q_end, prefix, rows, key_end


@triton.jit
def _split_chunk(key_end, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys per split of a tile that needs ``key_end`` keys: ``ceil(key_end / S)`` rounded up to whole
    key blocks, so chunks never share a block; the last chunks may be empty."""
    return tl.cdiv(tl.cdiv(key_end, NUM_SPLITS), BLOCK_N) * BLOCK_N


@triton.jit
def _unified_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_ml_ptr, part_acc_ptr, arrived_ptr,
    tables_ptr, context_lens_ptr, query_start_ptr, tile_seq_ptr, tile_row_ptr, num_tiles_ptr,
    qk_scale,                                    # log2(e) / sqrt(Dh)
    num_heads,                                   # H
    stride_qn, stride_qh,                        # q: (N, H, Dh)
    stride_kblock, stride_kslot, stride_kh,      # k, v pools: (blocks, block_size, H, Dh), same strides
    stride_on, stride_oh,                        # out: (N, H, Dh)
    stride_tb,                                   # block tables: (B, M)
    stride_mlk, stride_mls, stride_mln,          # split partials m, l: (2, S, N, H), head stride 1
    stride_as, stride_an, stride_ah,             # split partial acc: (S, N, H, Dh), dim stride 1
                                                 # arrived: (tiles, H) int32 counters, all 0 between launches
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    WHILE_LOOP: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_launch_next(USE_PDL)
    # one flat grid, the head fastest, then the key chunk, then the tile: every program of the tile
    # that reads the most keys (the host lists it first, build_tiles) starts first, all its heads and
    # chunks, and the short tiles fill in at the end (see the module docstring, "Launch order")
    pid = tl.program_id(0)
    head = pid % num_heads
    split = (pid // num_heads) % NUM_SPLITS      # always 0 with NUM_SPLITS == 1
    tile = pid // (num_heads * NUM_SPLITS)
    if tile >= tl.load(num_tiles_ptr):           # a padded program of the static grid
        return
    # the step's tables are written by the host before the step, never by a kernel: read them while
    # the kernel ahead (the K/V write) finishes; the queries and the pool only after it (pdl.py)
    seq, first, q_start, q_end, prefix, rows, key_end = _tile_extent(
        tile, tables_ptr, context_lens_ptr, query_start_ptr, tile_seq_ptr, tile_row_ptr, BLOCK_M)
    pdl_wait(USE_PDL)
    row_ok = rows < q_end
    pos = prefix + (rows - q_start)                            # absolute positions of the queries

    d = tl.arange(0, HEAD_DIM_P2)
    d_ok = d < HEAD_DIM
    q_rows = rows.to(tl.int64) * stride_qn + head * stride_qh                  # (BLOCK_M,) int64
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)          # (BLOCK_M, Dh)
    if DOT_FP32:
        q = q.to(tl.float32)

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)       # running max of the scores (log2 units)
    l = tl.zeros((BLOCK_M,), tl.float32)                      # running sum of 2^(score - m)
    acc = tl.zeros((BLOCK_M, HEAD_DIM_P2), tl.float32)        # running sum of 2^(score - m) * v
    # keys before the tile's first position are visible to all its rows: whole blocks of them go
    # without a mask; the blocks from there to the tile's last position straddle the diagonal
    full_end = (prefix + first - q_start + 1) // BLOCK_N * BLOCK_N
    if NUM_SPLITS == 1:                          # one program walks all the keys
        lo = full_end * 0
        hi = key_end
    else:                                        # this program walks chunk `split` only (maybe empty)
        chunk = _split_chunk(key_end, NUM_SPLITS, BLOCK_N)
        lo = tl.minimum(split * chunk, key_end)
        hi = tl.minimum(lo + chunk, key_end)
    m, l, acc = _attend_key_range(q, m, l, acc, lo, tl.minimum(hi, full_end), hi, pos, seq, head, d, d_ok,
                                  k_ptr, v_ptr, tables_ptr, qk_scale, stride_kblock, stride_kslot, stride_kh,
                                  stride_tb, BLOCK_SIZE, BLOCK_N, False, DOT_FP32, IEEE, WHILE_LOOP, False)
    m, l, acc = _attend_key_range(q, m, l, acc, tl.maximum(lo, full_end), hi, hi, pos, seq, head, d, d_ok,
                                  k_ptr, v_ptr, tables_ptr, qk_scale, stride_kblock, stride_kslot, stride_kh,
                                  stride_tb, BLOCK_SIZE, BLOCK_N, True, DOT_FP32, IEEE, WHILE_LOOP,
                                  NUM_SPLITS > 1)
    if NUM_SPLITS == 1:
        out = acc / l[:, None]
        out_rows = rows.to(tl.int64) * stride_on + head * stride_oh
        tl.store(out_ptr + out_rows[:, None] + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    elif lo < hi:                                # a chunk that holds keys: its unnormalised partial
        at = split * stride_mls + rows.to(tl.int64) * stride_mln + head            # (BLOCK_M,)
        tl.store(part_ml_ptr + at, m, mask=row_ok)
        tl.store(part_ml_ptr + stride_mlk + at, l, mask=row_ok)
        acc_at = split * stride_as + rows.to(tl.int64) * stride_an + head * stride_ah
        tl.store(part_acc_ptr + acc_at[:, None] + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        # every thread's stores are done before the count (barrier); the atomic releases them to the
        # GPU and, in the program that arrives last, acquires the other programs' stores
        tl.debug_barrier()
        counter = arrived_ptr + tile * num_heads + head
        live_splits = tl.cdiv(key_end, _split_chunk(key_end, NUM_SPLITS, BLOCK_N))
        if tl.atomic_add(counter, 1, sem="acq_rel") == live_splits - 1:
            tl.store(counter, 0)                 # ready for the next launch (the next layer)
            _merge_partials(out_ptr, part_ml_ptr, part_acc_ptr, rows, row_ok, head, live_splits, d, d_ok,
                            stride_on, stride_oh, stride_mlk, stride_mls, stride_mln, stride_as, stride_an,
                            stride_ah, BLOCK_M, HEAD_DIM_P2, NUM_SPLITS)


@triton.jit
def _merge_partials(out_ptr, part_ml_ptr, part_acc_ptr, rows, row_ok, head, live_splits, d, d_ok,
                    stride_on, stride_oh, stride_mlk, stride_mls, stride_mln, stride_as, stride_an, stride_ah,
                    BLOCK_M: tl.constexpr, HEAD_DIM_P2: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """The exact softmax of a tile's rows from its chunks' partials, ``M = max m_s``,
    ``out = Σ 2^(m_s - M) acc_s / Σ 2^(m_s - M) l_s``. Only the ``live_splits`` chunks that hold keys
    are read (the others were never written); chunk 0 always holds key 0, which every row sees. The
    partials were written by other programs: read from L2 (``.cg``), never from a stale L1 line."""
    at = rows.to(tl.int64) * stride_mln + head                                  # (BLOCK_M,)
    acc_at = rows.to(tl.int64) * stride_an + head * stride_ah
    m_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        ok = row_ok & (s < live_splits)
        m_max = tl.maximum(m_max, tl.load(part_ml_ptr + s * stride_mls + at, mask=ok, other=float("-inf"),
                                          cache_modifier=".cg"))
    m_use = tl.where(row_ok, m_max, 0.0)         # rows past the tile's end: no -inf - -inf (NaN)
    l_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM_P2), tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        ok = row_ok & (s < live_splits)
        m_s = tl.load(part_ml_ptr + s * stride_mls + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
        w = tl.where(ok, tl.exp2(m_s - m_use), 0.0)                             # 0 for empty chunks
        l_sum += w * tl.load(part_ml_ptr + stride_mlk + s * stride_mls + at, mask=ok, other=0.0,
                             cache_modifier=".cg")
        a = tl.load(part_acc_ptr + s * stride_as + acc_at[:, None] + d[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")   # (BLOCK_M, Dh)
        acc += w[:, None] * a
    out = acc / tl.where(row_ok, l_sum, 1.0)[:, None]
    out_rows = rows.to(tl.int64) * stride_on + head * stride_oh
    tl.store(out_ptr + out_rows[:, None] + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unified_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor, query_start: torch.Tensor,
                      tile_seq: torch.Tensor, tile_row: torch.Tensor, num_tiles: torch.Tensor,
                      grid_tiles: int, block_m: int, out: torch.Tensor | None = None,
                      block_n: int | None = None, num_warps: int = 4, num_stages: int | None = None,
                      num_splits: int = 1, split_counters: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of every new query row ``q`` (N, H, Dh) against its sequence's keys → (N, H, Dh).

    ``k_cache``/``v_cache``: one layer of the pool ``(blocks, block_size, H, Dh)``, already holding the
    new tokens' K/V. Per sequence (B of them): ``block_tables`` (B, M), ``context_lens`` (B,),
    ``query_start`` (B + 1,). Per tile: ``tile_seq``, ``tile_row`` (from :func:`build_tiles`, built
    with the same ``block_m``); ``num_tiles`` (1,) live tiles; ``grid_tiles`` >= that, a fixed launch
    size. All device tensors, no host synchronisation: safe inside a CUDA graph. Rows not covered by
    a tile (padding) are left as they are in ``out``. ``block_n``: keys per loop trip (default:
    :func:`default_block_n`); ``num_stages``: the key loop's pipeline stages (default:
    :func:`default_num_stages`).

    ``num_splits`` > 1: split-KV — each tile's keys in that many chunks, one program each; the last
    of a (tile, head)'s programs to finish merges them. Its fp32 scratch ``(S, N, H, Dh + 2)`` is
    allocated here with a shape fixed by the arguments, so inside a captured graph it is allocated
    once, at capture, in the graph's pool. ``split_counters``: int32, at least ``grid_tiles * H``
    of them, all 0, and left 0 by the launch, so one buffer serves every layer and every replay
    (TritonAttention keeps one); without it a zeroed one is made here, one more kernel.
    """
    N, H, Dh = q.shape
    if k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("unified_attention needs the head dimension contiguous")
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    if out is None:
        out = torch.empty_like(q)
    fp32 = q.dtype == torch.float32
    pdl = pdl_enabled(q.device)
    if block_n is None:
        block_n = default_block_n(block_m, grid_tiles, num_splits, Dh * q.element_size(), N)
    if num_stages is None:
        num_stages = default_num_stages(block_m, block_n)
    if num_splits > 1:
        part_ml = torch.empty(2, num_splits, N, H, dtype=torch.float32, device=q.device)       # m and l
        part_acc = torch.empty(num_splits, N, H, Dh, dtype=torch.float32, device=q.device)
        if split_counters is None:
            split_counters = torch.zeros(grid_tiles * H, dtype=torch.int32, device=q.device)
        elif (split_counters.dtype != torch.int32 or split_counters.device != q.device
              or not split_counters.is_contiguous() or split_counters.numel() < grid_tiles * H):
            raise ValueError(f"split_counters must be a contiguous int32 tensor of at least grid_tiles * H = "
                             f"{grid_tiles * H} zeros on {q.device}, got {split_counters.dtype} "
                             f"{tuple(split_counters.shape)} on {split_counters.device}")
    else:
        part_ml = part_acc = split_counters = out                                           # not read
    consts = dict(HEAD_DIM=Dh, HEAD_DIM_P2=max(16, triton.next_power_of_2(Dh)), BLOCK_M=block_m, BLOCK_N=block_n,
                  NUM_SPLITS=num_splits)
    part_strides = (part_ml.stride(0), part_ml.stride(1), part_ml.stride(2),
                    part_acc.stride(0), part_acc.stride(1), part_acc.stride(2))
    _unified_attention_kernel[(grid_tiles * H * num_splits,)](
        q, k_cache, v_cache, out, part_ml, part_acc, split_counters,
        block_tables, context_lens, query_start, tile_seq, tile_row, num_tiles,
        LOG2_E / math.sqrt(Dh), H,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        *part_strides,
        BLOCK_SIZE=k_cache.shape[1], DOT_FP32=fp32 or _interpreting(),
        IEEE=fp32 and not _interpreting(), WHILE_LOOP=_interpreting(),
        num_warps=num_warps, num_stages=num_stages, USE_PDL=pdl, launch_pdl=pdl, **consts,
    )
    return out
