"""One step's flat batch: every new token of every scheduled request, end to end, no padding.

The scheduler says which requests get how many tokens; :func:`build_flat_batch` lays them out
for the model, on the host, with numpy (a Python list of thousands of ids takes milliseconds to
become a tensor; numpy arrays convert for free):

* ``input_ids``, ``positions``: each new token and its position in its request;
* ``slot_mapping``: the KV slot each new token writes, ``block_table[pos // bs] * bs + pos % bs``;
* ``query_start``: where each request's rows begin (cumulative query lengths, ``cu_seqlens_q``);
* ``context_lens``: keys each request attends to, cached prefix + new tokens;
* ``block_tables``: each request's blocks, padded with the null block;
* ``logits_indices``: the rows whose logits are sampled (a request's last known token);
* ``feed_rows``: 0 where the row's id is the one in ``input_ids``, ``r + 1`` where the id is the
  token the previous step sampled in its logit row ``r``, still on the device (asynchronous
  scheduling, engine.py: the host has not read it yet; ``input_ids`` holds 0 there). 0 means
  "the host's id" so that the zero padding of a CUDA graph's buffers is a valid value.

A decode is just a request with one new token, a prefill one with many: the same batch, the same
forward, different shapes. Requests with a single new row come first, so attention can treat
them as one batch. The same numbers mean the same thing on every path: the CPU path wraps them
as tensors, the CUDA path copies them into a step graph's static buffers (step_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .block_manager import NULL_BLOCK
from .scheduler import ScheduledSeq

#: the per-token, per-request and per-logit-row arrays every path reads, in transfer order
COMMON_ARRAYS = ("input_ids", "positions", "slot_mapping", "logits_indices", "context_lens", "query_start",
                 "feed_rows")


@dataclass
class FlatBatch:
    """N new tokens, B requests, R logit rows, M blocks in the widest block table (host arrays)."""

    seqs: list[ScheduledSeq]        # (B,) in batch order: single-row requests first
    input_ids: np.ndarray           # (N,) int64
    positions: np.ndarray           # (N,)
    slot_mapping: np.ndarray        # (N,)
    query_start: np.ndarray         # (B + 1,)
    context_lens: np.ndarray        # (B,)
    block_tables: np.ndarray        # (B, M)
    logits_indices: np.ndarray      # (R,)
    num_single_rows: int            # requests 0..num_single_rows-1 have one new token each
    feed_rows: np.ndarray | None = None   # (N,) 0: id from input_ids; r + 1: the previous step's sampled row r
    tiles: dict = field(default_factory=dict)   # the Triton path's tile table by tile rows, once built

    def __post_init__(self):
        if self.feed_rows is None:
            self.feed_rows = np.zeros(len(self.input_ids), dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def query_lens(self) -> np.ndarray:
        return self.query_start[1:] - self.query_start[:-1]           # (B,) np.diff's result, a third of its cost

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in COMMON_ARRAYS}


def build_flat_batch(scheduled: list[ScheduledSeq], block_size: int) -> FlatBatch:
    seqs = sorted(scheduled, key=lambda s: s.num_new_tokens != 1)          # single rows first (stable)
    # one pass over the requests collects Python lists; each array is then made in one conversion
    # (a numpy assignment per request costs microseconds, and a decode step has a request a row)
    # the ids: prompt tokens as slices of each prompt's array; the others (decode rows: a request's
    # outputs) gathered in a list of ints, made an array before the next prompt slice (`pieces`)
    pieces, ids, fed_rows, fed_from, qlens, starts, tables, logit_rows = [], [], [], [], [], [], [], []
    row = 0
    for s in seqs:
        n, seq = s.num_new_tokens, s.seq
        start, end = s.start, s.start + n
        prompt = seq.prompt_array
        if start < len(prompt):                    # prompt tokens (a prefill, or its chunk)
            if ids:
                pieces.append(np.fromiter(ids, dtype=np.int64, count=len(ids)))
                ids = []
            pieces.append(prompt[start:end])
            start = len(prompt)
        if start < end:                            # tokens past the prompt (decode rows)
            known = seq.token_ids[start:end]
            ids += known
            if start + len(known) < end:           # its last new token is still on the device
                assert start + len(known) == end - 1 and seq.feed_row >= 0, "only the last token can be in flight"
                ids.append(0)
                fed_rows.append(row + n - 1)
                fed_from.append(seq.feed_row + 1)
        row += n
        if s.needs_logits:
            logit_rows.append(row - 1)
        qlens.append(n)
        starts.append(s.start)
        tables.append(s.seq.block_table)
    qlens = np.array(qlens, dtype=np.int64)                                 # (B,)
    starts = np.array(starts, dtype=np.int64)                               # (B,) cached before the step
    query_start = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(qlens, out=query_start[1:])                                   # (B + 1,)
    ids = np.fromiter(ids, dtype=np.int64, count=len(ids))                  # (N,) twice as fast as np.array
    if pieces:                                 # a copy: the batch never shares a prompt's array
        ids = np.concatenate(pieces + [ids])
    feed = np.zeros(len(ids), dtype=np.int64)                               # (N,) mostly the host's ids
    feed[fed_rows] = fed_from
    seq_of_row = np.repeat(np.arange(len(seqs)), qlens)                     # (N,)
    positions = starts[seq_of_row] + np.arange(len(ids)) - query_start[seq_of_row]   # (N,)
    width = max(map(len, tables))                 # the block tables padded with the null block, in one list
    padded = []
    for t in tables:
        padded += t
        padded += [NULL_BLOCK] * (width - len(t))
    tables = np.fromiter(padded, dtype=np.int64, count=len(padded)).reshape(len(seqs), width)   # (B, M)
    slots = tables[seq_of_row, positions // block_size] * block_size + positions % block_size   # (N,)
    num_single = next((i for i, n in enumerate(qlens.tolist()) if n != 1), len(seqs))
    return FlatBatch(seqs=seqs, input_ids=ids, positions=positions, slot_mapping=slots, query_start=query_start,
                     context_lens=starts + qlens, block_tables=tables,
                     logits_indices=np.array(logit_rows, dtype=np.int64),  # (R,)
                     num_single_rows=num_single, feed_rows=feed)


def next_decode_batch(flat: FlatBatch, block_size: int) -> FlatBatch:
    """The step after ``flat``, an all-decode batch (one row per request, each row its request's
    logit row), when every row's next id is the token ``flat`` samples — still on the device
    (a decode burst, engine.py): positions and lengths one further, each row fed from its own
    logit row, the new slots from the same block tables (which must already hold them)."""
    B = flat.num_seqs
    assert flat.num_tokens == B == flat.num_single_rows, "a decode burst continues all-decode batches only"
    positions = flat.positions + 1                                                   # (B,)
    column = positions // block_size
    assert int(column.max()) < flat.block_tables.shape[1], "the burst's blocks were not allocated"
    slots = flat.block_tables[np.arange(B), column] * block_size + positions % block_size   # (B,)
    return FlatBatch(seqs=flat.seqs, input_ids=np.zeros(B, dtype=np.int64), positions=positions,
                     slot_mapping=slots, query_start=flat.query_start, context_lens=flat.context_lens + 1,
                     block_tables=flat.block_tables, logits_indices=flat.logits_indices, num_single_rows=B,
                     feed_rows=flat.logits_indices + 1,
                     tiles=flat.tiles)     # one tile a request, and each request reads one key more: same order

