"""Glass box: an opt-in record of what the engine decided at each step (for notebook 11).

With ``LLM(..., snapshot=True)`` every step appends a :class:`StepSnapshot`: which request got
how many tokens (a prefill chunk or a decode), prefix-cache hits, preemptions, every running
request's block table and the slot each new token wrote. With ``snapshot=False`` (the default)
the engine never builds one: the list is ``None`` and the cost is one ``if``.
Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepSnapshot:
    step: int
    scheduled: list[dict]            # {"request_id", "num_tokens", "start", "kind": "prefill"|"decode"}
    prefix_hits: dict[str, int]      # request id -> prompt tokens reused from the cache
    preempted: list[str]             # request ids sent back to the queue (their KV dropped)
    block_tables: dict[str, list[int]]
    slot_mapping: list[int]          # per new token of the flat batch, in batch order
    num_free_blocks: int
    finished: list[str]


def take_snapshot(step: int, sched, batch, block_manager, finished) -> StepSnapshot:
    scheduled = [{"request_id": s.seq.request_id, "num_tokens": s.num_new_tokens, "start": s.start,
                  "kind": "decode" if s.num_new_tokens == 1 and s.start >= s.seq.num_prompt_tokens else "prefill"}
                 for s in batch.seqs]
    return StepSnapshot(
        step=step, scheduled=scheduled, prefix_hits=dict(sched.prefix_hits),
        preempted=[q.request_id for q in sched.preempted],
        block_tables={s.seq.request_id: list(s.seq.block_table) for s in batch.seqs if s.seq.block_table},
        slot_mapping=batch.slot_mapping.tolist(), num_free_blocks=block_manager.num_free_blocks,
        finished=[q.request_id for q in finished])
