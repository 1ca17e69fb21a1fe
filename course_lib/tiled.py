"""Attention computed tile by tile, in numpy: what FlashAttention-style kernels do, slowly and visibly.

* :func:`online_softmax_steps` — one query row against its keys, one tile of keys at a time, with
  a running maximum ``m``, a running sum ``l`` of ``exp(score - m)`` and an unnormalised output
  ``acc`` that is rescaled whenever the maximum grows (:class:`SoftmaxState`). Nothing as long
  as the whole row is ever kept.
* :func:`merge_states` — two such partial states over disjoint key ranges combined into one: the
  same rule, used by split-KV decoding (:func:`split_kv_decode`).
* :func:`tiled_causal_attention` — tiles of queries against tiles of keys; tiles wholly above the
  diagonal are skipped, diagonal tiles masked; returns the output and :class:`TileCounts`, what
  the loop actually did (tile pairs, multiply-adds, largest score block).
* :func:`rope_rotate`, :func:`rope_attention` — rotary positions, and why a cache of rotated keys
  can be extended one token at a time.

Shapes: one head, ``(T, Dh)`` for queries, keys and values unless a function says otherwise.
Introduced in notebooks/12_flash_attention.ipynb.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

# --------------------------------------------------------------------------- checks


def _matrix(name: str, x, ndim: int = 2) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim:
        raise InputError(f"{name} must be a {ndim}-D array, got shape {a.shape}")
    if a.size == 0:
        raise InputError(f"{name} is empty: give at least one row")
    return a


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _qkv(q, k, v):
    q, k, v = _matrix("q", q), _matrix("k", k), _matrix("v", v)
    if k.shape != v.shape:
        raise InputError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if q.shape[1] != k.shape[1]:
        raise InputError(f"q and k must share the head dimension, got {q.shape[1]} and {k.shape[1]}")
    return q, k, v


# --------------------------------------------------------------------------- references


def softmax(x, axis: int = -1) -> np.ndarray:
    """The row softmax, computed the stable way (subtract the row maximum first)."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def naive_attention(q, k, v, causal: bool = True) -> np.ndarray:
    """``softmax(q kᵀ / √Dh + mask) v`` with the whole ``(Tq, Tk)`` score matrix; the last ``Tq``
    of ``Tk`` positions are the queries (as in :func:`course_lib.model.causal_mask`). → ``(Tq, Dh)``."""
    q, k, v = _qkv(q, k, v)
    scores = q @ k.T / math.sqrt(q.shape[1])                   # (Tq, Tk): the full matrix
    if causal:
        Tq, Tk = scores.shape
        visible = np.arange(Tk)[None, :] <= np.arange(Tk - Tq, Tk)[:, None]
        scores = np.where(visible, scores, -np.inf)
    return softmax(scores) @ v


# --------------------------------------------------------------------------- online softmax


@dataclass
class SoftmaxState:
    """What a kernel keeps for one query row between key tiles.

    ``m``: the largest score seen so far; ``l``: ``Σ exp(score - m)`` over the keys seen;
    ``acc``: ``Σ exp(score - m) · v`` over the same keys, ``(Dh,)``. ``acc / l`` is the attention
    output over the keys seen so far. ``keys_seen``: how many keys went in.
    """

    m: float
    l: float
    acc: np.ndarray
    keys_seen: int = 0

    @property
    def output(self) -> np.ndarray:
        return self.acc / self.l

    @classmethod
    def empty(cls, head_dim: int) -> "SoftmaxState":
        return cls(-math.inf, 0.0, np.zeros(head_dim))


def fold_tile(state: SoftmaxState, scores, values) -> tuple[SoftmaxState, float]:
    """The state after one more tile of keys: its ``scores`` ``(n,)`` and ``values`` ``(n, Dh)``.

    Returns the new state and ``alpha = exp(m_old - m_new)``, the factor by which the old sum and
    output were rescaled (1 when the maximum did not grow).
    """
    scores = np.asarray(scores, dtype=np.float64)
    m_new = max(state.m, float(scores.max()))
    alpha = math.exp(state.m - m_new)                          # 0 for the first tile (m = -inf)
    p = np.exp(scores - m_new)                                 # (n,) this tile's unnormalised weights
    return SoftmaxState(m_new, state.l * alpha + float(p.sum()), state.acc * alpha + p @ values,
                        state.keys_seen + len(scores)), alpha


def merge_states(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """Two states over disjoint key ranges → the state over both (order does not matter)."""
    m = max(a.m, b.m)
    wa, wb = math.exp(a.m - m), math.exp(b.m - m)
    return SoftmaxState(m, a.l * wa + b.l * wb, a.acc * wa + b.acc * wb, a.keys_seen + b.keys_seen)


@dataclass
class OnlineSoftmaxRun:
    """One query row processed tile by tile: the scores (kept only to draw them), the tile
    boundaries, and the state and rescale factor after every tile."""

    scores: np.ndarray                  # (S,) scaled scores of the row
    bounds: list                        # [(start, end)] key range of each tile
    states: list = field(default_factory=list)   # SoftmaxState after tile 0, 1, ...
    alphas: list = field(default_factory=list)   # rescale factor applied at each tile

    @property
    def n_tiles(self) -> int:
        return len(self.bounds)


def online_softmax_steps(q, k, v, tile: int) -> OnlineSoftmaxRun:
    """One query ``q`` ``(Dh,)`` against keys ``k`` and values ``v`` ``(S, Dh)``, ``tile`` keys at a time."""
    q = _matrix("q", q, ndim=1)
    k, v = _matrix("k", k), _matrix("v", v)
    tile = _positive_int("tile", tile)
    if k.shape != v.shape or k.shape[1] != q.shape[0]:
        raise InputError(f"need k, v of shape (S, {q.shape[0]}); got {k.shape} and {v.shape}")
    S = k.shape[0]
    run = OnlineSoftmaxRun(k @ q / math.sqrt(q.shape[0]), [(a, min(a + tile, S)) for a in range(0, S, tile)])
    state = SoftmaxState.empty(q.shape[0])
    for a, b in run.bounds:
        s = k[a:b] @ q / math.sqrt(q.shape[0])                 # (b - a,) only this tile's scores
        state, alpha = fold_tile(state, s, v[a:b])
        run.states.append(state)
        run.alphas.append(alpha)
    return run


# --------------------------------------------------------------------------- tiled causal attention


@dataclass
class TileCounts:
    """What :func:`tiled_causal_attention` did, counted inside its loop.

    ``grid[i, j]``: 0 = tile pair skipped (every key after every query), 1 = computed without a
    mask, 2 = computed with the mask (it straddles the diagonal). ``macs_done``: multiply-adds of
    ``Q Kᵀ`` and ``P V`` in the tiles computed; ``macs_full``: what the full ``T × T`` rectangle
    costs; ``macs_needed``: the visible (query, key) pairs alone. ``largest_scores``: the most
    score entries ever held at once.
    """

    grid: np.ndarray
    macs_done: int = 0
    macs_full: int = 0
    macs_needed: int = 0
    largest_scores: int = 0

    @property
    def pairs_total(self) -> int:
        return int(self.grid.size)

    @property
    def pairs_skipped(self) -> int:
        return int((self.grid == 0).sum())

    @property
    def pairs_masked(self) -> int:
        return int((self.grid == 2).sum())

    @property
    def pairs_done(self) -> int:
        return self.pairs_total - self.pairs_skipped

    @property
    def fraction_skipped(self) -> float:
        """Share of the full rectangle's multiply-adds the loop never did."""
        return 1 - self.macs_done / self.macs_full


def tiled_causal_attention(q, k, v, tile_q: int, tile_k: int | None = None,
                           causal: bool = True) -> tuple[np.ndarray, TileCounts]:
    """Causal self-attention ``(T, Dh)`` → ``(T, Dh)`` without ever building the ``T × T`` scores.

    Query tile ``i`` (rows ``i·tile_q ..``) walks key tiles ``j`` left to right with the online
    softmax of :func:`fold_tile`, one state per row. A key tile whose first key lies after the query
    tile's last row is skipped (``causal``); one that straddles the diagonal gets the mask.
    """
    q, k, v = _qkv(q, k, v)
    T, Dh = q.shape
    if k.shape[0] != T:
        raise InputError(f"self-attention needs as many keys as queries, got {k.shape[0]} and {T}")
    tile_q = _positive_int("tile_q", tile_q)
    tile_k = tile_q if tile_k is None else _positive_int("tile_k", tile_k)
    scale = 1 / math.sqrt(Dh)
    nq, nk = -(-T // tile_q), -(-T // tile_k)
    counts = TileCounts(np.zeros((nq, nk), dtype=int), macs_full=2 * T * T * Dh,
                        macs_needed=2 * (T * (T + 1) // 2) * Dh)
    out = np.empty_like(q)
    for i in range(nq):
        r0, r1 = i * tile_q, min((i + 1) * tile_q, T)
        m = np.full(r1 - r0, -np.inf)                          # (rows,) running max
        l = np.zeros(r1 - r0)                                  # (rows,) running sum
        acc = np.zeros((r1 - r0, Dh))                          # (rows, Dh) unnormalised output
        for j in range(nk):
            c0, c1 = j * tile_k, min((j + 1) * tile_k, T)
            if causal and c0 > r1 - 1:                         # every key after every row: skip
                continue
            s = q[r0:r1] @ k[c0:c1].T * scale                  # (rows, keys): one tile of scores
            masked = causal and c1 - 1 > r0
            if masked:                                         # the tile straddles the diagonal
                s = np.where(np.arange(c0, c1)[None, :] <= np.arange(r0, r1)[:, None], s, -np.inf)
            m_new = np.maximum(m, s.max(axis=1))
            alpha = np.exp(m - m_new)
            p = np.exp(s - m_new[:, None])
            l = l * alpha + p.sum(axis=1)
            acc = acc * alpha[:, None] + p @ v[c0:c1]
            m = m_new
            counts.grid[i, j] = 2 if masked else 1
            counts.macs_done += 2 * s.size * Dh                # Q Kᵀ and P V of this tile
            counts.largest_scores = max(counts.largest_scores, s.size)
        out[r0:r1] = acc / l[:, None]
    if not causal:
        counts.macs_needed = counts.macs_full
    return out, counts


# --------------------------------------------------------------------------- split-KV decode


@dataclass
class SplitDecode:
    """One decode query per head against a long cache, cut into key ranges.

    ``output`` ``(H, Dh)``; ``partials[h][r]``: the :class:`SoftmaxState` of head ``h`` over range
    ``r`` (each an independent piece of work); ``ranges``: the key ranges.
    """

    output: np.ndarray
    partials: list
    ranges: list

    @property
    def work_items(self) -> int:
        return sum(len(p) for p in self.partials)


def split_kv_decode(q, k, v, split: int) -> SplitDecode:
    """``q`` ``(H, Dh)``, ``k``/``v`` ``(S, H, Dh)``: each head's keys in ranges of ``split`` keys,
    one partial state per (head, range), merged with :func:`merge_states`."""
    q = _matrix("q", q)
    k, v = _matrix("k", k, ndim=3), _matrix("v", v, ndim=3)
    split = _positive_int("split", split)
    H, Dh = q.shape
    if k.shape != v.shape or k.shape[1:] != (H, Dh):
        raise InputError(f"need k, v of shape (S, {H}, {Dh}); got {k.shape} and {v.shape}")
    S = k.shape[0]
    ranges = [(a, min(a + split, S)) for a in range(0, S, split)]
    partials, out = [], np.empty((H, Dh))
    for h in range(H):
        row = []
        for a, b in ranges:                                    # independent: any order, any worker
            s = k[a:b, h] @ q[h] / math.sqrt(Dh)               # (b - a,)
            row.append(fold_tile(SoftmaxState.empty(Dh), s, v[a:b, h])[0])
        partials.append(row)
        merged = row[0]
        for part in row[1:]:
            merged = merge_states(merged, part)
        out[h] = merged.output
    return SplitDecode(out, partials, ranges)


# --------------------------------------------------------------------------- rotary positions


def rope_rotate(x, positions, base: float = 10000.0) -> np.ndarray:
    """Rotate each pair ``(x[2i], x[2i+1])`` of every row by ``position · base^(-2i/Dh)``.

    ``x`` ``(T, Dh)`` with ``Dh`` even, ``positions`` ``(T,)``. A rotation keeps lengths, and
    ``rope(q, m) · rope(k, n)`` depends on ``m - n`` only.
    """
    x = _matrix("x", x)
    T, Dh = x.shape
    if Dh % 2:
        raise InputError(f"rotary positions rotate pairs of dimensions: Dh must be even, got {Dh}")
    pos = np.asarray(positions, dtype=np.float64).reshape(-1)
    if pos.shape[0] != T:
        raise InputError(f"need one position per row: {T} rows, {pos.shape[0]} positions")
    freqs = base ** (-np.arange(0, Dh, 2) / Dh)               # (Dh/2,)
    angle = pos[:, None] * freqs[None, :]                      # (T, Dh/2)
    cos, sin = np.cos(angle), np.sin(angle)
    even, odd = x[:, 0::2], x[:, 1::2]
    out = np.empty_like(x)
    out[:, 0::2] = even * cos - odd * sin
    out[:, 1::2] = even * sin + odd * cos
    return out


def rope_attention(q, k, v, positions, base: float = 10000.0) -> np.ndarray:
    """Causal attention with rotary positions: rotate ``q`` and ``k`` by their positions, then
    :func:`naive_attention`. ``positions`` ``(T,)`` for the ``T`` rows of ``q``, ``k`` and ``v``."""
    q, k, v = _qkv(q, k, v)
    return naive_attention(rope_rotate(q, positions, base), rope_rotate(k, positions, base), v)
