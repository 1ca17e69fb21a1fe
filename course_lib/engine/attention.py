"""Attention over the paged KV cache, behind one small interface.

Every backend computes, for each sequence of the flat step batch, the causal attention of its
new query rows against *all* its keys: the cached prefix plus the new tokens (whose K/V the
runner has just written into the pool). A decode row is just a sequence with one query.

* :class:`TorchAttention` — the readable reference: gather the keys, scores, scale, causal
  mask, softmax, weighted sum, exactly as the reference model does; runs anywhere.
* :class:`SDPAAttention` — the same with ``torch.nn.functional.scaled_dot_product_attention``
  (fused kernels on GPU); decode rows go in one batched call with fixed shapes, so CUDA graphs
  can capture it.
* :class:`TritonAttention` (GPU) — SDPA for prefill rows, and a Triton kernel that walks each
  sequence's block table for decode rows (``triton_decode.py``).
* :class:`UnifiedTritonAttention` (GPU) — one FlashAttention-style Triton kernel for *every* row
  (``triton_unified.py``), reading the step's structure from device tensors: a whole step, prefill
  included, can be captured as one CUDA graph (``cuda_graphs="full"``, see step_graphs.py).

Introduced in notebooks/11_inside_an_engine.ipynb; the tiled kernel in notebooks/12.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ..model import causal_mask
from .kv_cache import PagedKVCache


def sequence_slots(block_table: torch.Tensor, num_tokens: int, block_size: int) -> torch.Tensor:
    """Slots of tokens ``0..num_tokens-1`` of one sequence: ``(num_tokens,)``."""
    pos = torch.arange(num_tokens, device=block_table.device)
    return block_table[pos // block_size].long() * block_size + pos % block_size


class AttentionBackend:
    """``forward(q, k, v, kv_cache, layer, batch) -> (N, H, Dh)``; ``q``, ``k``, ``v`` are the new
    tokens' ``(N, H, Dh)`` and ``batch`` a :class:`~course_lib.engine.runner.StepBatch`."""

    name = "base"
    graph_safe = False     # decode reads only device tensors: a CUDA graph can capture it
    needs_tiles = False    # reads StepBatch.tiles (the unified kernel's tile table)

    def forward(self, q, k, v, kv: PagedKVCache, layer: int, batch) -> torch.Tensor:
        nd = batch.num_decodes                       # decode rows come first, one per sequence
        groups = batch.prefill_groups
        if nd == 0 and len(groups) == 1 and groups[0][2]:
            return self.prefill_fresh(q, k, v, kv, layer, batch, 0, batch.num_seqs)   # no copy
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self.decode(q[:nd], kv, layer, batch)
        for first, end, fresh in groups:
            a, b = batch.query_start[first], batch.query_start[end]
            if fresh:
                out[a:b] = self.prefill_fresh(q[a:b], k[a:b], v[a:b], kv, layer, batch, first, end)
            else:
                out[a:b] = self.prefill(q[a:b], k[a:b], v[a:b], kv, layer, batch, first)
        return out

    def prefill_fresh(self, q, k, v, kv, layer, batch, first, end) -> torch.Tensor:
        """Sequences ``first..end-1``: equal query lengths and no cached prefix, rows end to end."""
        n = q.shape[0] // (end - first)
        return torch.cat([self.prefill(q[j * n:(j + 1) * n], k[j * n:(j + 1) * n], v[j * n:(j + 1) * n],
                                       kv, layer, batch, first + j) for j in range(end - first)])

    def decode(self, q, kv, layer, batch) -> torch.Tensor:
        """One query row per sequence ``(B, H, Dh)`` against each sequence's cached keys."""
        return torch.cat([self.prefill(q[i:i + 1], None, None, kv, layer, batch, i)
                          for i in range(q.shape[0])])

    def prefill(self, q, k, v, kv, layer, batch, i) -> torch.Tensor:
        raise NotImplementedError


class TorchAttention(AttentionBackend):
    """The reference, written out step by step (runs on CPU and GPU)."""

    name = "torch"

    def prefill(self, q, k, v, kv, layer, batch, i):
        n, H, Dh = q.shape                                            # n new queries
        S = batch.context_lens_host[i]                                 # keys: prefix + new
        slots = sequence_slots(batch.block_tables[i], S, kv.block_size)
        keys, values = kv.gather(layer, slots)                         # (S, H, Dh)
        scores = q.transpose(0, 1) @ keys.permute(1, 2, 0)             # (H, n, S)
        scaled = scores / math.sqrt(Dh)
        mask = causal_mask(n, S, device=q.device)                      # (n, S): the last n of S
        weights = torch.softmax(scaled.masked_fill(~mask, float("-inf")), dim=-1)
        return (weights @ values.transpose(0, 1)).transpose(0, 1)      # (n, H, Dh)


class SDPAAttention(AttentionBackend):
    """PyTorch's fused attention; decode rows batched with fixed shapes (CUDA-graph safe)."""

    name = "sdpa"
    graph_safe = True

    def prefill(self, q, k, v, kv, layer, batch, i):
        n = q.shape[0]
        S = batch.context_lens_host[i]
        qh = q.transpose(0, 1)[None]                                   # (1, H, n, Dh)
        if S == n:                                                     # no cached prefix
            out = F.scaled_dot_product_attention(qh, k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                                 is_causal=True)
        else:
            slots = sequence_slots(batch.block_tables[i], S, kv.block_size)
            keys, values = kv.gather(layer, slots)                     # (S, H, Dh)
            mask = causal_mask(n, S, device=q.device)
            out = F.scaled_dot_product_attention(qh, keys.transpose(0, 1)[None],
                                                 values.transpose(0, 1)[None], attn_mask=mask)
        return out[0].transpose(0, 1)                                  # (n, H, Dh)

    def prefill_fresh(self, q, k, v, kv, layer, batch, first, end):
        G = end - first
        N, H, Dh = q.shape
        q, k, v = (t.view(G, N // G, H, Dh).transpose(1, 2) for t in (q, k, v))   # (G, H, n, Dh)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)               # (G, H, n, Dh)
        return out.transpose(1, 2).reshape(N, H, Dh)

    def decode(self, q, kv, layer, batch):
        B, H, Dh = q.shape
        tables = batch.block_tables[:B].long()                         # (B, M)
        bs = kv.block_size
        offsets = torch.arange(bs, device=q.device)
        slots = (tables[:, :, None] * bs + offsets).reshape(B, -1)     # (B, M * bs)
        keys = kv.k[layer].view(-1, H, Dh)[slots]                      # (B, S_max, H, Dh)
        values = kv.v[layer].view(-1, H, Dh)[slots]
        pos = torch.arange(slots.shape[1], device=q.device)
        mask = (pos[None, :] < batch.context_lens[:B, None]) | (pos[None, :] == 0)  # (B, S_max)
        out = F.scaled_dot_product_attention(q[:, :, None, :], keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=mask[:, None, None, :])      # (B, H, 1, Dh)
        return out[:, :, 0, :]


class TritonAttention(SDPAAttention):
    """SDPA for prefill rows; the paged decode kernel of triton_decode.py for decode rows."""

    name = "triton"

    def decode(self, q, kv, layer, batch):
        from .triton_decode import paged_decode_attention

        B = q.shape[0]
        return paged_decode_attention(q, kv.k[layer], kv.v[layer], batch.block_tables[:B],
                                      batch.context_lens[:B])


class UnifiedTritonAttention(AttentionBackend):
    """Every row of the step — decodes, fresh prefills, cached prefixes, chunks — in one launch of
    the unified kernel. The runner gives the batch a tile table (``batch.tiles``); nothing here
    reads a host-side length, so the whole step is graph-safe."""

    name = "triton-unified"
    graph_safe = True
    needs_tiles = True     # the runner builds StepBatch.tiles for this backend

    def forward(self, q, k, v, kv, layer, batch):
        from .triton_unified import unified_attention

        t = batch.tiles
        # padded rows of a captured step belong to no tile: zero them rather than leave garbage
        out = torch.zeros_like(q) if batch.padded else torch.empty_like(q)         # (N, H, Dh)
        return unified_attention(q, kv.k[layer], kv.v[layer], batch.block_tables, batch.context_lens,
                                 t.query_start, t.seq, t.row, t.count, t.grid, t.block_m, out=out)


BACKENDS = {"torch": TorchAttention, "sdpa": SDPAAttention, "triton": TritonAttention,
            "triton-unified": UnifiedTritonAttention}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def make_backend(name: str | None, device: torch.device) -> AttentionBackend:
    """``None`` picks: Triton on CUDA when installed, else SDPA on CUDA, the reference on CPU
    (the engine itself picks ``triton-unified`` on CUDA when it captures whole steps)."""
    from ..errors import ConfigError

    if name is None:
        if device.type == "cuda":
            name = "triton" if triton_available() else "sdpa"
        else:
            name = "torch"
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    if name == "triton-unified" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("attention='triton-unified' needs a CUDA GPU; on CPU set TRITON_INTERPRET=1 before "
                          "starting Python to run the kernel (slowly) through the Triton interpreter")
    if name in ("triton", "triton-unified") and not triton_available():
        raise ConfigError(f"attention={name!r} needs the triton package (pip install triton)")
    return BACKENDS[name]()
