"""Attention over the paged KV cache: two implementations behind one small interface.

For each request of the flat step batch (batch.py), attention computes the causal attention of
its new query rows against *all* its keys: the cached prefix plus the new tokens, whose K/V the
runner has just written into the pool. A decode is a request with one query row.

* :class:`TorchAttention` — batched ``scaled_dot_product_attention``, readable and the CPU
  default. Single-row requests (decodes) go in one call over their gathered blocks; fresh prompts
  of equal length in one causal call; a request with a cached prefix or a later chunk gathers its
  keys through its block table and masks by absolute position.
* :class:`TritonAttention` — the unified FlashAttention-style Triton kernel (triton_unified.py):
  one launch for every row of the step, reading the step's layout from device tensors only, so a
  whole step can be captured as one CUDA graph (step_graphs.py). The CUDA default. Small steps
  (decodes) split each sequence's keys over several programs (split-KV, ``max_kv_splits``).

Each implementation says which per-step arrays it reads beyond the common ones
(:meth:`extra_arrays`), turns the arrays on the device into its own metadata (:meth:`metadata`),
and computes ``forward(q, k, v, kv_cache, layer, metadata) -> (N, H, Dh)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..model import causal_mask
from .attention_tiles import build_tiles, kv_splits_for, split_grid_bound, tile_rows_for
from .batch import FlatBatch
from .kv_cache import PagedKVCache


# ---------------------------------------------------------------------------------- torch / SDPA
@dataclass
class TorchMetadata:
    block_tables: torch.Tensor      # (B, M) block ids, null-block padded
    query_start: list[int]          # (B + 1,) on the host: the loops below read it
    context_lens: list[int]         # (B,) keys per request
    num_single_rows: int            # requests 0..num_single_rows-1 have one query row each (b of them)
    single_row_blocks: torch.Tensor  # (b * M,) their block tables, flattened: one gather per layer
    single_row_bias: torch.Tensor   # (b, 1, 1, M * bs) 0 for their keys, -inf past each one's length


def gather_keys(kv: PagedKVCache, layer: int, block_table: torch.Tensor, num_keys: int):
    """Keys and values ``(num_keys, H, Dh)`` of one request, read block by block from the pool."""
    H, Dh = kv.k[layer].shape[-2:]
    blocks = block_table[: -(-num_keys // kv.block_size)]
    keys = kv.k[layer].index_select(0, blocks).view(-1, H, Dh)[:num_keys]
    return keys, kv.v[layer].index_select(0, blocks).view(-1, H, Dh)[:num_keys]


class TorchAttention:
    name = "torch"

    def extra_arrays(self, flat: FlatBatch) -> dict[str, np.ndarray]:
        return {"block_tables": flat.block_tables}

    def metadata(self, flat: FlatBatch, views: dict[str, torch.Tensor], dtype: torch.dtype,
                 block_size: int) -> TorchMetadata:
        """Built once per step, read by every layer."""
        nd, tables = flat.num_single_rows, views["block_tables"]
        keys = torch.arange(tables.shape[1] * block_size, device=tables.device)                 # (M * bs,)
        visible = keys < views["context_lens"][:nd, None]                                       # (b, M * bs)
        bias = torch.zeros(visible.shape, dtype=dtype, device=tables.device).masked_fill_(~visible, float("-inf"))
        return TorchMetadata(block_tables=tables, query_start=flat.query_start.tolist(),
                             context_lens=flat.context_lens.tolist(), num_single_rows=nd,
                             single_row_blocks=tables[:nd].flatten(), single_row_bias=bias[:, None, None, :])

    def forward(self, q, k, v, kv: PagedKVCache, layer: int, meta: TorchMetadata) -> torch.Tensor:
        qs, ctx, nd = meta.query_start, meta.context_lens, meta.num_single_rows
        fresh_run = _fresh_equal_run(qs, ctx, nd, len(ctx))
        if fresh_run == len(ctx) - nd and nd == 0:       # one batch of fresh, equal prompts: no copy
            return self.fresh_prompts(q, k, v, len(ctx))
        out = torch.empty_like(q)                        # (N, H, Dh)
        if nd:
            out[:nd] = self.single_rows(q[:nd], kv, layer, meta.single_row_blocks, meta.single_row_bias)
        i = nd
        while i < len(ctx):
            run = _fresh_equal_run(qs, ctx, i, len(ctx))
            a, b = qs[i], qs[i + max(run, 1)]
            if run:                                      # requests i..i+run-1: fresh, equal lengths
                out[a:b] = self.fresh_prompts(q[a:b], k[a:b], v[a:b], run)
                i += run
            else:                                        # a cached prefix or a later chunk
                out[a:b] = self.with_prefix(q[a:b], kv, layer, meta.block_tables[i], ctx[i])
                i += 1
        return out

    @staticmethod
    def fresh_prompts(q, k, v, count: int) -> torch.Tensor:
        """``count`` prompts of equal length and no cached prefix, rows end to end: one causal call."""
        N, H, Dh = q.shape
        q, k, v = (t.view(count, N // count, H, Dh).transpose(1, 2) for t in (q, k, v))   # (G, H, n, Dh)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)                   # (G, H, n, Dh)
        return out.transpose(1, 2).reshape(N, H, Dh)

    @staticmethod
    def with_prefix(q, kv, layer, block_table, num_keys: int) -> torch.Tensor:
        """The last ``n`` of ``num_keys`` positions of one request attend to keys 0..own position."""
        n = q.shape[0]
        keys, values = gather_keys(kv, layer, block_table, num_keys)                    # (S, H, Dh)
        mask = causal_mask(n, num_keys, device=q.device)                                # (n, S)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                             attn_mask=mask)                            # (H, n, Dh)
        return out.transpose(0, 1)                                                      # (n, H, Dh)

    @staticmethod
    def single_rows(q, kv, layer, blocks, bias) -> torch.Tensor:
        """One query row per request ``(b, H, Dh)`` against its keys: the blocks of all b requests
        gathered in one index, keys past each request's length masked out by ``bias``."""
        B, H, Dh = q.shape
        keys = kv.k[layer].index_select(0, blocks).view(B, -1, H, Dh)                   # (b, M * bs, H, Dh)
        values = kv.v[layer].index_select(0, blocks).view(B, -1, H, Dh)
        out = F.scaled_dot_product_attention(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=bias)                            # (b, H, 1, Dh)
        return out[:, :, 0]


def _fresh_equal_run(qs: list[int], ctx: list[int], i: int, end: int) -> int:
    """How many requests from ``i`` on have no cached prefix and the query length of request ``i``."""
    n = qs[i + 1] - qs[i] if i < end else 0
    j = i
    while j < end and qs[j + 1] - qs[j] == n and ctx[j] == n and n > 1:
        j += 1
    return j - i


# ---------------------------------------------------------------------------------- Triton
@dataclass
class TritonMetadata:
    """The unified kernel's view of a step; every field a device tensor (CUDA-graph safe)."""

    block_tables: torch.Tensor     # (B, M)
    context_lens: torch.Tensor     # (B,)
    query_start: torch.Tensor      # (B + 1,)
    tile_seq: torch.Tensor         # (T,) the request of each tile
    tile_row: torch.Tensor         # (T,) the flat row of each tile's first query
    num_tiles: torch.Tensor        # (1,) live tiles; programs past it exit
    grid: int                      # programs launched along the tile axis (>= live tiles)
    block_m: int                   # query rows per tile


#: SMs assumed where there are none (the Triton interpreter on a CPU): an H200's, so an interpreted
#: run splits the keys as the GPU would
NOMINAL_SMS = 132


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device: torch.device) -> int:
    """The GPU's streaming multiprocessors; :data:`NOMINAL_SMS` off CUDA."""
    if device.type != "cuda":
        return NOMINAL_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


class TritonAttention:
    """``max_kv_splits``: at most this many key chunks per (tile, head) in small steps (split-KV, see
    triton_unified.py); 1 = every (tile, head) walks its keys in one program. ``max_keys`` (the
    model's context) and ``head_bytes`` (one head's key, in bytes) bound the chunks that can ever
    hold keys (attention_tiles.kv_splits_for)."""

    name = "triton"

    def __init__(self, max_kv_splits: int = 1, max_keys: int | None = None, head_bytes: int = 128):
        if isinstance(max_kv_splits, bool) or not isinstance(max_kv_splits, int) or max_kv_splits < 1:
            raise ConfigError(f"max_kv_splits must be a positive integer, got {max_kv_splits!r}")
        self.max_kv_splits = max_kv_splits
        self.max_keys, self.head_bytes = max_keys, head_bytes
        self._split_counters: dict[torch.device, torch.Tensor] = {}

    def num_splits(self, meta: "TritonMetadata", num_heads: int, device: torch.device) -> int:
        """Key chunks of this step's grid: from static sizes only, so fixed per graph bucket."""
        return kv_splits_for(meta.grid, num_heads, meta.block_m, multiprocessor_count(device), self.max_kv_splits,
                             self.max_keys, self.head_bytes)

    def split_counters(self, device: torch.device) -> torch.Tensor:
        """Split-KV's arrival counters (triton_unified.py): int32 zeros that every launch leaves at
        zero, so one buffer serves every layer, step and captured graph. Made at the first split
        step, which is a warm-up forward before any capture (step_graphs.py) or an eager step."""
        counters = self._split_counters.get(device)
        if counters is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("split-KV counters must be made before a CUDA-graph capture: run the "
                                   "bucket's forward once outside the capture first (StepGraphs.capture does)")
            size = split_grid_bound(multiprocessor_count(device))
            counters = self._split_counters[device] = torch.zeros(size, dtype=torch.int32, device=device)
        return counters

    def extra_arrays(self, flat: FlatBatch, block_m: int | None = None) -> dict[str, np.ndarray]:
        """The block tables and the tile table; the tile table is kept in ``flat.tiles`` (the steps
        of a decode burst share it: batch.next_decode_batch)."""
        block_m = block_m or tile_rows_for(flat.num_tokens)
        if block_m not in flat.tiles:
            tile_seq, tile_row = build_tiles(flat.query_start.tolist(), flat.context_lens.tolist(), block_m)
            flat.tiles[block_m] = {"tile_seq": np.asarray(tile_seq, dtype=np.int64),
                                   "tile_row": np.asarray(tile_row, dtype=np.int64),
                                   "num_tiles": np.array([len(tile_seq)])}
        return {"block_tables": flat.block_tables, **flat.tiles[block_m]}

    def metadata(self, flat: FlatBatch | None, views: dict[str, torch.Tensor], dtype=None, block_size=None,
                 grid: int | None = None, block_m: int | None = None) -> TritonMetadata:
        """Eager steps: from ``flat``; a captured step graph: its static buffers, ``grid`` and ``block_m``."""
        if flat is not None:
            grid, block_m = len(views["tile_seq"]), tile_rows_for(flat.num_tokens)
        return TritonMetadata(block_tables=views["block_tables"], context_lens=views["context_lens"],
                              query_start=views["query_start"], tile_seq=views["tile_seq"],
                              tile_row=views["tile_row"], num_tiles=views["num_tiles"], grid=grid,
                              block_m=block_m)

    def forward(self, q, k, v, kv: PagedKVCache, layer: int, meta: TritonMetadata) -> torch.Tensor:
        from .triton_unified import unified_attention

        # rows that belong to no tile (a captured step's padding) keep whatever the buffer held: every
        # later kernel is row by row, their K/V go to the null block, whose keys no tile loads
        out = torch.empty_like(q)                                                        # (N, H, Dh)
        splits = self.num_splits(meta, q.shape[1], q.device)
        return unified_attention(q, kv.k[layer], kv.v[layer], meta.block_tables, meta.context_lens,
                                 meta.query_start, meta.tile_seq, meta.tile_row, meta.num_tiles, meta.grid,
                                 meta.block_m, out=out, num_splits=splits,
                                 split_counters=self.split_counters(q.device) if splits > 1 else None)


def make_attention(name: str, max_kv_splits: int = 1, max_keys: int | None = None, head_bytes: int = 128):
    """``"torch"`` or ``"triton"`` (EngineConfig.resolve has checked that it can run here);
    ``max_kv_splits``: the Triton path's split-KV cap (1: off); ``max_keys``, ``head_bytes``: the
    model's context and one head's key size (bytes), which bound the useful split count."""
    if name == "triton":
        return TritonAttention(max_kv_splits, max_keys, head_bytes)
    return TorchAttention()
