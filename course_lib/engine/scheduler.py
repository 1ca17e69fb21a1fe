"""The scheduler: which requests get how many tokens computed in the next step.

Continuous batching in the style of vLLM v1. There is no "prefill phase" and "decode phase":
each request wants ``num_tokens - num_computed_tokens`` tokens computed (the whole prompt at
first, then 1 per step), and one token budget per step, ``max_num_batched_tokens``, is shared
by all of them. Each step:

1. running requests first, oldest first: each gets what it wants, up to the budget left
   (a long prompt gets a *chunk* when chunked prefill is on). When the pool has no block for
   it, the newest running request is *preempted*: its blocks are freed and it goes back to
   the front of the queue, to be recomputed later (recompute, not swap);
2. then, if nothing was preempted, waiting requests in arrival order (first come, first
   served) while budget, ``max_num_seqs`` and blocks last. A request's first full blocks may
   be found in the prefix cache and are then not computed again.
Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int        # tokens computed for it this step
    start: int                 # its num_computed_tokens before the step
    needs_logits: bool = False  # the step reaches its last known token: sample the next one

    def __post_init__(self):
        self.needs_logits = self.start + self.num_new_tokens == self.seq.num_tokens + self.seq.num_in_flight

    @property
    def is_decode(self) -> bool:
        """One new token that was itself sampled (not a prompt token): the engine's one definition
        of a decode. A one-token last chunk of a prompt is a prefill."""
        return self.num_new_tokens == 1 and self.start >= self.seq.num_prompt_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    prefix_hits: dict[str, int] = field(default_factory=dict)   # request id -> tokens reused

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int,
                 enable_chunked_prefill: bool = True):
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # requests whose last token (by max_tokens) is in flight: no blocks, never scheduled again,
        # finished once the engine learns that token (asynchronous scheduling, engine.py)
        self.finishing: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.finishing)

    def abort(self, seq: Sequence) -> None:
        """Drop a request wherever it is; its blocks go back to the pool (a token of it still in
        flight is discarded when the engine learns it)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.finishing:
            self.finishing.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.free_sequence(seq)
        if not seq.is_finished:
            seq.finish("abort", time.perf_counter())

    def requeue(self, seqs: list[Sequence]) -> None:
        """Send ``seqs`` back to the front of the queue, in this order, with no blocks: what a failed
        step leaves behind (like a preemption, but not counted as one)."""
        for seq in reversed(seqs):
            if seq in self.running:
                self.running.remove(seq)
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.block_manager.free_sequence(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.block_manager.begin_step()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # 1. running requests, oldest first; preempt the newest when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0:                                  # nothing to compute (never happens in the engine)
                i += 1
                continue
            while not bm.allocate(seq, n):
                victim = self.running.pop()             # the newest running request
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
                budget -= n
                i += 1
                continue
            break                                       # seq itself was preempted

        # 2. waiting requests, first come first served
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_in_flight:                       # preempted this step: its last token is not known yet
                break
            hits = bm.find_cached_prefix(seq)
            num_cached = len(hits) * bm.block_size
            n = seq.num_tokens - num_cached
            if n > budget:
                if not self.enable_chunked_prefill:
                    break                               # whole prompts only: wait for a bigger budget
                n = budget
            if not bm.allocate(seq, n, hits):
                break
            self.waiting.popleft()
            if seq.first_scheduled_time is None:        # prefix-cache statistics: first admission only
                seq.first_scheduled_time = time.perf_counter()
                bm.num_queried_tokens += seq.num_tokens
                bm.num_hit_tokens += num_cached
                seq.num_cached_prompt_tokens = num_cached
            if num_cached:
                out.prefix_hits[seq.request_id] = num_cached
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n, num_cached))
            budget -= n
        return out

    def reserve_burst(self, out: SchedulerOutput, most: int) -> int:
        """Reserve a decode burst for the scheduled step (engine.py): how many decode steps, at most
        ``most``, it may run before the next scheduling. 1 unless every scheduled request is a
        greedy decode without log-probabilities, nothing was preempted and nobody waits (a waiting
        request must not wait for a burst to end); then as many as the request nearest its
        ``max_tokens`` may still sample, and only if the pool holds every request's blocks for all
        of them — those blocks are allocated here (the burst writes their K/V before any later step
        reads them)."""
        if most <= 1 or out.preempted or self.waiting or not out.scheduled:
            return 1
        steps = most
        for s in out.scheduled:
            seq, p = s.seq, s.seq.params
            if not s.is_decode or not p.greedy or p.logprobs:
                return 1
            steps = min(steps, p.max_tokens - seq.num_output_tokens - seq.num_in_flight)
        if steps <= 1:
            return 1
        bm = self.block_manager
        need = sum(max(0, bm.blocks_needed(s.start + steps) - len(s.seq.block_table)) for s in out.scheduled)
        if need > bm.num_free_blocks:
            return 1
        for s in out.scheduled:
            allocated = bm.allocate(s.seq, steps)
            assert allocated, "counted free blocks ran out"
        return steps

    def advance(self, out: SchedulerOutput, steps: int = 1) -> None:
        """The step's forward has been issued (``steps`` > 1: a decode burst of that many steps): its
        tokens count as computed (their K/V are written before any later step reads them: one device
        stream runs the steps in order)."""
        for s in out.scheduled:
            s.seq.num_computed_tokens = s.start + s.num_new_tokens + steps - 1

    def retire_at_length(self, seqs: list[Sequence]) -> list[Sequence]:
        """Of ``seqs`` (those that sampled in the step just issued), the ones whose new token is their
        last by ``max_tokens``: out of ``running`` into ``finishing``, their blocks freed now (no step
        reads them again), so the next step neither computes a wasted token for them nor keeps their
        slot. Returns them."""
        running = set(map(id, self.running))
        retired = [q for q in seqs if id(q) in running and q.reaches_max_tokens]
        for seq in retired:
            seq.last_token_in_flight = True
            self.running.remove(seq)
            self.block_manager.free_sequence(seq)
            self.finishing.append(seq)
        return retired

    def drop_finished(self, finished: list[Sequence]) -> None:
        """Take finished requests out of every queue; give back the blocks of those that hold any."""
        if not finished:
            return
        done = set(map(id, finished))
        self.running = [q for q in self.running if id(q) not in done]
        self.finishing = [q for q in self.finishing if id(q) not in done]
        if any(id(q) in done for q in self.waiting):   # preempted while its last token was in flight
            self.waiting = deque(q for q in self.waiting if id(q) not in done)
        for seq in finished:
            self.block_manager.free_sequence(seq)

    def finish_step(self, out: SchedulerOutput) -> list[Sequence]:
        """Driving the scheduler by hand, synchronously: the step's sampled tokens are already
        appended to its sequences. Advance every scheduled sequence; drop finished ones. Returns
        those that finished."""
        self.advance(out)
        finished = [s.seq for s in out.scheduled if s.seq.is_finished]
        self.drop_finished(finished)
        return finished
