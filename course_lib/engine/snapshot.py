"""Glass box: an opt-in record of what the engine decided at each step (for notebook 11).

With ``LLM(..., snapshot=True)`` every step appends a :class:`StepSnapshot`: which request got
how many tokens (a prefill chunk or a decode), prefix-cache hits, preemptions, every running
request's block table, the step's flat batch as plain lists (what the runner fed the model) and
the step's time (engine.StepClock). A snapshot is appended when its step is issued; with
asynchronous scheduling its ``sampled`` tokens, its end-of-text finishes, its time and the input ids
its decode rows took on the device are filled in a call later, when the host reads them, so a
finished run's snapshots read the same with it on or off. With ``snapshot=False`` (the default)
the engine never builds one: the list is ``None`` and the cost is one ``if``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepSnapshot:
    step: int
    scheduled: list[dict]            # in batch order: {"request_id", "num_tokens", "start", "kind": "prefill"|"decode"}
    prefix_hits: dict[str, int]      # request id -> prompt tokens reused from the cache
    preempted: list[str]             # request ids sent back to the queue (their KV dropped)
    block_tables: dict[str, list[int]]   # every request that holds blocks after the step
    # the flat batch of the step, row by row (N new tokens, B scheduled requests, R logit rows)
    input_ids: list[int]             # (N,)
    positions: list[int]             # (N,) position of each new token in its request
    slot_mapping: list[int]          # (N,) the KV slot each new token wrote
    query_start: list[int]           # (B + 1,) where each request's rows begin
    context_lens: list[int]          # (B,) keys each request attends to: cached + new
    logits_indices: list[int]        # (R,) rows whose logits were sampled
    sampled: dict[str, int]          # request id -> the token sampled for it this step
    num_free_blocks: int
    num_blocks: int                  # usable blocks of the pool
    finished: list[str]
    seconds: float                   # wall time of the step


def take_snapshot(step: int, sched, flat, block_manager, finished, sampled, seconds: float,
                  running) -> StepSnapshot:
    """What step ``step`` did: the scheduler's output ``sched``, the flat batch ``flat`` (batch.py)."""
    scheduled = [{"request_id": s.seq.request_id, "num_tokens": s.num_new_tokens, "start": s.start,
                  "kind": "decode" if s.is_decode else "prefill"} for s in flat.seqs]
    return StepSnapshot(
        step=step, scheduled=scheduled, prefix_hits=dict(sched.prefix_hits),
        preempted=[q.request_id for q in sched.preempted],
        block_tables={q.request_id: list(q.block_table) for q in running if q.block_table},
        input_ids=flat.input_ids.tolist(), positions=flat.positions.tolist(),
        slot_mapping=flat.slot_mapping.tolist(), query_start=flat.query_start.tolist(),
        context_lens=flat.context_lens.tolist(), logits_indices=flat.logits_indices.tolist(),
        sampled={seq.request_id: tok for seq, tok in sampled}, num_free_blocks=block_manager.num_free_blocks,
        num_blocks=block_manager.num_blocks, finished=[q.request_id for q in finished], seconds=seconds)
