"""The model runner: one flat, variable-length batch per step through the GPT's weights.

The scheduler's decisions become one :class:`StepBatch`: every new token of every scheduled
sequence laid end to end (no padding), with its position, the KV slot it writes, where each
sequence's queries start (``query_start``, cumulative lengths), how many keys each sequence
sees, the block tables, and which rows need logits. The runner then runs the weights of a
:class:`course_lib.model.GPT` (the reference model's own parameters; nothing is redefined):
embeddings → per layer LayerNorm, QKV, *write K/V into the pool*, attention backend, output
projection, MLP → final LayerNorm and the LM head on the logit rows only.

On CUDA, steps that are pure decode replay a CUDA graph captured for a bucketed batch size:
the whole forward is one launch, which is what makes batch-1 decode fast. With
``cuda_graphs="full"`` every step replays a graph of its token-count bucket (step_graphs.py),
attention being the unified Triton kernel (triton_unified.py).
Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from ..model import GPT, gelu
from .attention import AttentionBackend
from .block_manager import NULL_BLOCK
from .kv_cache import PagedKVCache
from .scheduler import ScheduledSeq, SchedulerOutput
from .attention_tiles import build_tiles, tile_rows_for
from .step_graphs import StepGraphs


@dataclass
class TileTable:
    """Which rows each program of the unified attention kernel covers (triton_unified.py)."""

    seq: torch.Tensor              # (T,) the sequence of each tile
    row: torch.Tensor              # (T,) the flat row of each tile's first query
    count: torch.Tensor            # (1,) live tiles; programs past it exit
    grid: int                      # programs launched along the tile axis (>= live tiles)
    block_m: int                   # query rows per tile
    query_start: torch.Tensor      # (B + 1,) cumulative query lengths, on the device


@dataclass
class StepBatch:
    """Everything one step's forward needs. N = new tokens, B = sequences, R = logit rows.

    Decode sequences (one new token each) come first: rows ``0..num_decodes-1``.
    """

    input_ids: torch.Tensor        # (N,) token ids
    positions: torch.Tensor        # (N,) absolute position of each token in its sequence
    slot_mapping: torch.Tensor     # (N,) KV slot each token writes
    query_start: list[int]         # (B + 1) cumulative query lengths (cu_seqlens_q)
    key_start: list[int]           # (B + 1) cumulative context lengths (cu_seqlens_k)
    context_lens: torch.Tensor     # (B,) keys each sequence attends to: cached + new
    context_lens_host: list[int]   # the same on the host, for per-sequence loops
    block_tables: torch.Tensor     # (B, M) block ids, padded with the null block
    logits_indices: torch.Tensor   # (R,) rows of the flat batch that need logits
    num_decodes: int
    seqs: list[ScheduledSeq] = field(default_factory=list)   # in batch order
    tiles: TileTable | None = None   # for the unified attention backend
    padded: bool = False             # rows past the live ones (a captured graph's static batch)
    graph_tokens: int | None = None  # the step-graph bucket this batch was loaded into

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_host)

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]

    @property
    def query_lens(self) -> list[int]:
        return [b - a for a, b in zip(self.query_start, self.query_start[1:])]

    @property
    def is_decode_only(self) -> bool:
        return self.num_decodes == self.num_seqs

    @cached_property
    def prefill_groups(self) -> list[tuple[int, int, bool]]:
        """Prefill sequences as ``(first, end, fresh)`` runs. A *fresh* run is consecutive sequences
        with no cached prefix and the same query length: attention can treat it as one (G, n) batch.
        Every other prefill sequence is a run of its own."""
        groups: list[tuple[int, int, bool]] = []
        qlens = self.query_lens
        for i in range(self.num_decodes, self.num_seqs):
            fresh = self.context_lens_host[i] == qlens[i]
            if groups and fresh and groups[-1][2] and qlens[groups[-1][0]] == qlens[i] and groups[-1][1] == i:
                groups[-1] = (groups[-1][0], i + 1, True)
            else:
                groups.append((i, i + 1, fresh))
        return groups

    @property
    def logit_seqs(self) -> list[ScheduledSeq]:
        return [s for s in self.seqs if s.needs_logits]


def _cumsum(xs: list[int]) -> list[int]:
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return out


class ModelRunner:
    def __init__(self, model: GPT, kv_cache: PagedKVCache, attention: AttentionBackend,
                 fast_gelu: bool = False):
        self.model = model
        self.config = model.config
        self.kv = kv_cache
        self.attention = attention
        self.device = model.transformer.wte.weight.device
        self.fast_gelu = fast_gelu and model.config.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        self.max_blocks_per_seq = math.ceil(self.config.n_positions / kv_cache.block_size)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_batch: StepBatch | None = None
        self.step_graphs = None      # StepGraphs, with cuda_graphs="full"

    # ------------------------------------------------------------------ metadata
    def prepare(self, sched: SchedulerOutput) -> StepBatch:
        """Scheduler output → flat batch tensors, built on the host and copied in one transfer."""
        seqs = sorted(sched.scheduled, key=lambda s: s.num_new_tokens != 1)   # decodes first (stable)
        bs = self.kv.block_size
        qlens = [s.num_new_tokens for s in seqs]
        ctx = [s.start + s.num_new_tokens for s in seqs]
        width = max(len(s.seq.block_table) for s in seqs)
        # built with numpy: converting Python lists of thousands of ids to torch costs milliseconds
        ids = np.concatenate([np.asarray(s.seq.token_ids[s.start:s.start + s.num_new_tokens], dtype=np.int64)
                              for s in seqs])                                   # (N,)
        pos = np.concatenate([np.arange(s.start, s.start + s.num_new_tokens, dtype=np.int64)
                              for s in seqs])                                   # (N,)
        tables = np.full((len(seqs), width), NULL_BLOCK, dtype=np.int64)        # (B, M)
        for i, s in enumerate(seqs):
            tables[i, :len(s.seq.block_table)] = s.seq.block_table
        seq_of_row = np.repeat(np.arange(len(seqs)), qlens)                     # (N,)
        slots = tables[seq_of_row, pos // bs] * bs + pos % bs                   # (N,)
        qstart = _cumsum(qlens)
        logit_rows = [qstart[i + 1] - 1 for i, s in enumerate(seqs) if s.needs_logits]
        common = dict(query_start=qstart, key_start=_cumsum(ctx), context_lens_host=ctx,
                      num_decodes=_leading_ones(qlens), seqs=seqs)
        bucket = self.step_graphs.bucket_for(len(ids), len(seqs)) if self.step_graphs else None
        if bucket is not None:       # into the static buffers of a captured step graph
            ids_d, pos_d, slots_d, ctx_d, rows_d, tables_d = self.step_graphs.load(
                bucket, ids, pos, slots, logit_rows, ctx, qstart, tables)
            return StepBatch(input_ids=ids_d, positions=pos_d, slot_mapping=slots_d, context_lens=ctx_d,
                             block_tables=tables_d, logits_indices=rows_d, graph_tokens=bucket, **common)
        # one host→device copy for everything, then views into it
        parts = [torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(slots),
                 torch.tensor(ctx, dtype=torch.long), torch.tensor(logit_rows, dtype=torch.long),
                 torch.from_numpy(tables).flatten()]
        if self.attention.needs_tiles:
            block_m = tile_rows_for(len(ids))
            tile_seq, tile_row = build_tiles(qstart, ctx, block_m)
            parts += [torch.tensor(qstart, dtype=torch.long), torch.tensor(tile_seq, dtype=torch.long),
                      torch.tensor(tile_row, dtype=torch.long), torch.tensor([len(tile_seq)], dtype=torch.long)]
        flat = torch.cat(parts).to(self.device, non_blocking=True)
        ids_d, pos_d, slots_d, ctx_d, rows_d, tables_d, *tile_parts = flat.split([p.numel() for p in parts])
        tiles = None
        if tile_parts:
            qstart_d, seq_d, row_d, count_d = tile_parts
            tiles = TileTable(seq=seq_d, row=row_d, count=count_d, grid=len(tile_seq), block_m=block_m,
                              query_start=qstart_d)
        return StepBatch(input_ids=ids_d, positions=pos_d, slot_mapping=slots_d, context_lens=ctx_d,
                         block_tables=tables_d.view(len(seqs), width), logits_indices=rows_d, tiles=tiles,
                         **common)

    # ------------------------------------------------------------------ compute
    def mlp(self, block, h: torch.Tensor) -> torch.Tensor:
        if self.fast_gelu:   # one fused kernel; same function as GPT-2's tanh formula
            return block.mlp.c_proj(F.gelu(block.mlp.c_fc(h), approximate="tanh"))
        return block.mlp.c_proj(gelu(block.mlp.c_fc(h), block.mlp.activation))

    @torch.no_grad()
    def forward(self, b: StepBatch, logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(R, V)`` for the rows in ``b.logits_indices``; writes every new token's K/V.
        ``logits_out`` (R, V): write them there (the step graphs share one logits buffer)."""
        tr = self.model.transformer
        N = b.input_ids.shape[0]
        D, H = self.config.n_embd, self.config.n_head
        x = tr.wte(b.input_ids) + tr.wpe(b.positions)                 # (N, D)
        for layer, block in enumerate(tr.h):
            h = block.ln_1(x)
            q, k, v = block.attn.c_attn(h).split(D, dim=-1)            # 3 x (N, D)
            q, k, v = (t.view(N, H, D // H) for t in (q, k, v))        # (N, H, Dh)
            self.kv.write(layer, k, v, b.slot_mapping)
            o = self.attention.forward(q, k, v, self.kv, layer, b)     # (N, H, Dh)
            x = x + block.attn.c_proj(o.reshape(N, D))
            x = x + self.mlp(block, block.ln_2(x))
        x = tr.ln_f(x[b.logits_indices])                               # (R, D): only rows that sample
        if logits_out is not None:
            return torch.mm(x, self.model.lm_head.weight.t(), out=logits_out)   # (R, V)
        return self.model.lm_head(x)                                   # (R, V)

    def execute(self, b: StepBatch) -> torch.Tensor:
        if b.graph_tokens is not None:                              # a whole-step graph
            return self.step_graphs.replay(b.graph_tokens, b.logits_indices.shape[0])
        if (self.graphs and b.is_decode_only and b.num_seqs <= max(self.graphs)
                and b.logits_indices.shape[0] == b.num_seqs):
            return self._replay(b)
        return self.forward(b)

    # ------------------------------------------------------------------ CUDA graphs
    def capture_step_graphs(self, max_tokens: int, max_num_seqs: int) -> None:
        """Capture the whole forward for every token bucket up to ``max_tokens`` (step_graphs.py)."""
        if not self.attention.needs_tiles:
            raise ValueError("whole-step graphs need an attention backend with a tile table (triton-unified)")
        self.step_graphs = StepGraphs(self, max_tokens, max_num_seqs)
        self.step_graphs.capture()

    def allocate_static_batch(self, max_batch: int) -> None:
        """Fixed buffers a captured graph reads: the decode batch of ``max_batch`` rows."""
        M, dev = self.max_blocks_per_seq, self.device
        self.graph_batch = StepBatch(
            input_ids=torch.zeros(max_batch, dtype=torch.long, device=dev),
            positions=torch.zeros(max_batch, dtype=torch.long, device=dev),
            slot_mapping=torch.zeros(max_batch, dtype=torch.long, device=dev),   # slot 0: the null block
            query_start=list(range(max_batch + 1)), key_start=list(range(max_batch + 1)),
            context_lens=torch.zeros(max_batch, dtype=torch.int32, device=dev),
            context_lens_host=[1] * max_batch,
            block_tables=torch.full((max_batch, M), NULL_BLOCK, dtype=torch.int32, device=dev),
            logits_indices=torch.arange(max_batch, device=dev), num_decodes=max_batch)

    def capture_cuda_graphs(self, batch_sizes: list[int]) -> None:
        """Capture the decode forward for each batch size (largest first, one memory pool)."""
        self.allocate_static_batch(max(batch_sizes))
        pool = torch.cuda.graph_pool_handle()
        for B in sorted(batch_sizes, reverse=True):
            view = self._graph_view(B)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):                  # warm up: compile kernels, pick algorithms
                for _ in range(2):
                    self.forward(view)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.forward(view)
            self.graphs[B] = (graph, logits)
        torch.cuda.synchronize()

    def _graph_view(self, B: int) -> StepBatch:
        g = self.graph_batch
        return StepBatch(g.input_ids[:B], g.positions[:B], g.slot_mapping[:B], g.query_start[:B + 1],
                         g.key_start[:B + 1], g.context_lens[:B], g.context_lens_host[:B],
                         g.block_tables[:B], g.logits_indices[:B], B)

    def _replay(self, b: StepBatch) -> torch.Tensor:
        n = b.num_seqs
        B = min(size for size in self.graphs if size >= n)
        g = self.graph_batch
        g.input_ids[:n].copy_(b.input_ids)
        g.positions[:n].copy_(b.positions)
        g.slot_mapping[:n].copy_(b.slot_mapping)
        g.context_lens[:n].copy_(b.context_lens)
        g.block_tables[:B].fill_(NULL_BLOCK)
        g.block_tables[:n, :b.block_tables.shape[1]].copy_(b.block_tables)
        if B > n:                                           # padded rows: null block, no keys
            g.input_ids[n:B].zero_()
            g.positions[n:B].zero_()
            g.slot_mapping[n:B].zero_()
            g.context_lens[n:B].zero_()
        graph, logits = self.graphs[B]
        graph.replay()
        return logits[:n]


def _leading_ones(qlens: list[int]) -> int:
    n = 0
    for q in qlens:
        if q != 1:
            break
        n += 1
    return n
