"""Whole-step CUDA graphs: every step — prefill, mixed, decode — replays one captured forward.

Why. A prefill step launches ~15 kernels per layer; on a slow host each launch costs tens of
microseconds, so a 12-layer step spends more time launching than computing. A CUDA graph records
the launches once and replays them all with one call.

How. A graph replays *fixed* kernels on *fixed* addresses with *fixed* shapes, so:

* the step's token count is rounded up to a **bucket** (1, 2, 4, ..., 512, then multiples of 512);
  one graph per bucket, captured for ``bucket`` token rows and ``min(bucket, max_num_seqs)``
  sequences and logit rows;
* every input lives in a **static buffer** per bucket (one int64 tensor cut into views: ids,
  positions, slots, logit rows, context lengths, query starts, the tile table, block tables); a step
  fills a host image of it and copies it over in one transfer, then replays;
* the attention kernel (triton_unified.py) has a static grid and reads which tile is whose from
  the buffer, so any mix of sequences fits the same graph;
* **padding**: token rows past the live ones have id 0, position 0 and write their K/V to slot 0,
  inside the null block (block_manager.NULL_BLOCK) that no sequence reads; they belong to no
  attention tile; logit rows past the live ones point at row 0 and are dropped.

All graphs are captured eagerly at start-up, largest bucket first, into one shared memory pool:
each smaller graph reuses the largest one's activation memory, all of them write their logits
into one shared ``(S, V)`` buffer, and no request ever waits for a capture in the middle of
serving (a capture costs one warm-up forward plus the capture itself).
Introduced in notebooks/12_flash_attention.ipynb.
"""

from __future__ import annotations

import numpy as np
import torch

from .attention_tiles import build_tiles, max_tiles, tile_rows_for


def token_buckets(max_tokens: int) -> list[int]:
    """Graph sizes covering 1..max_tokens: powers of two to 512, then multiples of 512; the last
    one is the first size >= max_tokens."""
    sizes = []
    for b in [1, 2, 4, 8, 16, 32, 64, 128, 256] + list(range(512, max_tokens + 512, 512)):
        sizes.append(b)
        if b >= max_tokens:
            break
    return sizes


class StepInputs:
    """The static buffers of one bucket: ``flat`` (one int64 tensor) and named views into it."""

    def __init__(self, num_tokens: int, max_num_seqs: int, max_blocks: int, device):
        self.num_tokens = N = num_tokens
        self.num_seqs = S = min(num_tokens, max_num_seqs)
        self.max_blocks = M = max_blocks
        self.block_m = tile_rows_for(N)
        self.max_tiles = T = max_tiles(N, S, self.block_m)
        self.sizes = {"input_ids": N, "positions": N, "slot_mapping": N, "logits_indices": S,
                      "context_lens": S, "query_start": S + 1, "tile_seq": T, "tile_row": T, "num_tiles": 1,
                      "block_tables": S * M}
        self.offsets, at = {}, 0
        for name, n in self.sizes.items():
            self.offsets[name] = at
            at += n
        self.flat = torch.zeros(at, dtype=torch.long, device=device)
        self.host = np.zeros(at, dtype=np.int64)             # its image on the host, refilled every step
        self.views = dict(zip(self.sizes, self.flat.split(list(self.sizes.values()))))
        self.views["block_tables"] = self.views["block_tables"].view(S, M)

    def host_image(self, ids, positions, slots, logit_rows, context_lens, query_start, tile_seq, tile_row,
                   tables: np.ndarray) -> torch.Tensor:
        """The buffer's contents for one step, on the host; unused entries 0 (padding → null block).

        A numpy array (single-threaded: a few small copies, no thread pool to wake) that is reused:
        copying from pageable memory returns once the data is staged, so refilling it for the next
        step cannot race the previous transfer."""
        host = self.host
        host.fill(0)
        for name, value in (("input_ids", ids), ("positions", positions), ("slot_mapping", slots),
                            ("logits_indices", logit_rows), ("context_lens", context_lens),
                            ("query_start", query_start), ("tile_seq", tile_seq), ("tile_row", tile_row)):
            n = len(value)
            if n:
                at = self.offsets[name]
                host[at:at + n] = value
        host[self.offsets["num_tiles"]] = len(tile_seq)
        B, width = tables.shape
        at = self.offsets["block_tables"]
        host[at:at + self.num_seqs * self.max_blocks].reshape(self.num_seqs, self.max_blocks)[:B, :width] = tables
        return torch.from_numpy(host)


class StepGraphs:
    """One captured forward per token bucket, replayed for any step that fits."""

    def __init__(self, runner, max_tokens: int, max_num_seqs: int):
        self.runner = runner
        self.max_num_seqs = max_num_seqs
        self.buckets = token_buckets(max_tokens)
        self.inputs: dict[int, StepInputs] = {}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def static_batch(self, inp: StepInputs):
        """The StepBatch the graph of this bucket is captured with: views of its buffer, full size."""
        from .runner import StepBatch, TileTable

        v = inp.views
        tiles = TileTable(seq=v["tile_seq"], row=v["tile_row"], count=v["num_tiles"], grid=inp.max_tiles,
                          block_m=inp.block_m, query_start=v["query_start"])
        return StepBatch(input_ids=v["input_ids"], positions=v["positions"], slot_mapping=v["slot_mapping"],
                         query_start=[0], key_start=[0], context_lens=v["context_lens"], context_lens_host=[],
                         block_tables=v["block_tables"], logits_indices=v["logits_indices"], num_decodes=0,
                         tiles=tiles, padded=True)

    def capture(self) -> None:
        """Capture every bucket, largest first, into one memory pool (the buffers start all-zero:
        no live tile, every row writes the null block — a harmless step to warm up on)."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        weight = self.runner.model.lm_head.weight
        rows = min(max(self.buckets), self.max_num_seqs)
        logits = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=weight.device)   # (S_max, V)
        for N in sorted(self.buckets, reverse=True):
            inp = StepInputs(N, self.max_num_seqs, self.runner.max_blocks_per_seq, self.runner.device)
            self.inputs[N] = inp
            batch = self.static_batch(inp)
            out = logits[:inp.num_seqs]                      # every graph writes the same logits buffer
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):                  # warm up: compile kernels, pick algorithms
                self.runner.forward(batch, logits_out=out)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.runner.forward(batch, logits_out=out)   # (S, V)
            self.graphs[N] = (graph, out)
        torch.cuda.synchronize()

    def bucket_for(self, num_tokens: int, num_seqs: int) -> int | None:
        for N in self.buckets:
            if N >= num_tokens:
                return N if num_seqs <= self.inputs[N].num_seqs else None
        return None

    def load(self, N: int, ids, positions, slots, logit_rows, context_lens, query_start,
             tables: np.ndarray):
        """Fill bucket ``N``'s buffer for one step (one host→device copy); returns the live-sized
        StepBatch fields that view it: ``(input_ids, positions, slot_mapping, context_lens,
        logits_indices, block_tables)``."""
        inp = self.inputs[N]
        tile_seq, tile_row = build_tiles(query_start, context_lens, inp.block_m)
        host = inp.host_image(ids, positions, slots, logit_rows, context_lens, query_start, tile_seq, tile_row,
                              tables)
        inp.flat.copy_(host, non_blocking=True)
        v, n, B = inp.views, len(ids), len(context_lens)
        return (v["input_ids"][:n], v["positions"][:n], v["slot_mapping"][:n], v["context_lens"][:B],
                v["logits_indices"][:len(logit_rows)], v["block_tables"][:B, :tables.shape[1]])

    def replay(self, N: int, num_logit_rows: int) -> torch.Tensor:
        graph, logits = self.graphs[N]
        graph.replay()
        return logits[:num_logit_rows]                       # (R, V), overwritten by the next replay
