"""The engine loop: add requests, then ``step()`` until none is left.

One step = the scheduler picks tokens → the flat batch is laid out (batch.py) → the runner runs
the model → the sampler picks one token per logit row, on the device → requests advance → once
the host reads the tokens, requests append them and finished ones free their blocks → the ledger
(and, when on, the snapshot list) records the step. A prefill and a decode are the same step at
different shapes.

Asynchronous scheduling (on by default): the host reads a step's tokens one call later, after it
has issued the next step, whose decode rows take those tokens straight from the device. On a GPU
the host's work for step n+1 (scheduling, the flat batch, the copy to the device) then overlaps
the device's step n. The same loop with a lag of 0 reads each step's tokens in its own call.

Decode bursts (``decode_burst``, 8 on CUDA): when every scheduled row is a greedy decode and nobody
waits, one call issues up to that many decode steps back to back — each laid out from the one
before by adding 1 to positions and lengths (batch.next_decode_batch), each row's id taken on the
device from the step before — and the host learns their tokens together. Scheduling and the
bookkeeping of learnt tokens are then paid once per burst; each further step costs the host only
its layout (a few numpy operations), its buffer copy and its launch.
"""

from __future__ import annotations

import _signal
import contextlib
import signal
import threading
import time
import weakref
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..model import GPT
from .batch import build_flat_batch, next_decode_batch
from .block_manager import BlockManager
from .config import EngineConfig
from .kv_cache import plan_num_blocks
from .metrics import Ledger
from .runner import build_runner
from .sampler import DeviceSample, HostSample, sample
from .scheduler import Scheduler
from .sequence import CheckedPrompt, SamplingParams, Sequence, check_request
from .snapshot import StepSnapshot, take_snapshot


class LLMEngine:
    def __init__(self, model: GPT, config: EngineConfig | None = None):
        """``model`` already on the config's device and dtype (the LLM class sees to it)."""
        config = config or EngineConfig()
        if not isinstance(config, EngineConfig):
            raise ConfigError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.model = model
        self.model_config = cfg = model.config
        self.config = config = config.resolve(cfg)
        self.num_kv_blocks = plan_num_blocks(cfg, config)
        self.device, self.dtype = config.device, config.dtype
        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens, config.max_num_seqs,
                                   config.enable_chunked_prefill)
        self.tp = None                   # the other ranks (tensor_parallel.py), with tensor_parallel_size > 1
        if config.tensor_parallel_size > 1:
            from .tensor_parallel import TensorParallelGroup

            self.tp = TensorParallelGroup(model, config, self.num_kv_blocks)   # starts ranks 1..N-1
            weakref.finalize(self, self.tp.shutdown)                          # on garbage collection and exit
            self.runner = self.tp.runner                                       # rank 0's shard
        else:
            self.runner = build_runner(model, config, self.num_kv_blocks)
        self.kv_cache = self.runner.kv
        self.ledger = Ledger(cfg, self.kv_cache.pool.element_size(), config.peak_flops, config.peak_bandwidth)
        self.snapshots: list[StepSnapshot] | None = [] if config.snapshot else None
        self.num_steps = 0
        self.lag = 1 if config.async_scheduling else 0   # steps between issuing a step and reading its tokens
        self.in_flight: InFlightStep | None = None       # issued, its tokens not read yet
        # decode steps one scheduling may run (1: every step is scheduled); never with snapshots, which
        # record every step's own schedule
        self.burst = 1 if config.snapshot else config.decode_burst

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (nothing to do with one rank); later steps raise."""
        if self.tp is not None:
            self.tp.shutdown()

    # ------------------------------------------------------------------ requests
    def check_request(self, prompt_token_ids, params: SamplingParams) -> CheckedPrompt:
        """The prompt's ids, or :class:`~course_lib.errors.InputError` saying why it cannot be served."""
        return check_request(prompt_token_ids, params, self.model_config, self.config, self.num_kv_blocks)

    def add_request(self, prompt_token_ids, params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        params = params or SamplingParams()
        return self.enqueue(self.check_request(prompt_token_ids, params), params, request_id)

    def enqueue(self, prompt: CheckedPrompt, params: SamplingParams, request_id: str | None = None) -> Sequence:
        """Queue a request whose prompt :meth:`check_request` has already accepted."""
        seq = Sequence(prompt.ids, params, eos_token_id=self.model_config.eos_token_id, request_id=request_id or "",
                       prompt_array=prompt.array)
        if params.seed is not None:      # the request's own random stream: independent of its batch
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a request wherever it is; its blocks go back to the pool (a token of it in flight is
        discarded)."""
        self.scheduler.abort(seq)
        self._drain_if_idle()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[tuple[Sequence, int]]:
        """Run one engine step; returns ``(sequence, new token)`` for every token learnt in this call.

        Asynchronous scheduling (``async_scheduling``, the default; a lag of 1): the call schedules
        and issues step n — decode rows whose token is still on the device take it from there — and
        only then reads step n-1's tokens (their copy to the host was started a step earlier), so
        on a GPU the host prepares step n while the device runs step n-1. It returns step n-1's
        tokens; a final call that issues nothing returns the last ones. Without it (a lag of 0) the
        same lines read step n's own tokens at the end of the call. Stops stay exact: a request that
        reaches ``max_tokens`` is known on the host and never scheduled again; one that samples
        an end-of-text or stop token is learnt a step late, and the token computed for it meanwhile
        is discarded (never appended, never counted). A decode burst (``decode_burst``) is one such
        step of several decode steps: it never runs past the ``max_tokens`` of any of its requests,
        and the tokens a request samples after its stop token inside it are discarded the same way.

        A step either happens whole or leaves no trace: scheduling and the final bookkeeping are
        never cut in half by Ctrl-C (the interrupt is held until they are done), and any exception
        in between — an interrupt or out-of-memory error in the forward pass, a failure while
        sampling — sends the step's requests back to the front of the queue with no blocks, and
        forgets the prefix-cache names of blocks whose K/V were never written; the step before it,
        already issued, is learnt then. The next step recomputes the failed one, exactly. With
        tensor parallelism a Ctrl-C also waits for the forward to end on every rank; a failed rank
        stops the engine (tensor_parallel.py)."""
        if self.tp is not None:
            self.tp.check_usable()
        clock = StepClock(self.device)
        sched, rng_states, previous, steps = None, [], self.in_flight, 1
        try:
            with deferred_interrupts():       # a Ctrl-C here is raised once scheduling is whole, then undone below
                sched = self.scheduler.schedule()
                if sched.is_empty:
                    if previous is None and self.scheduler.has_unfinished():
                        raise RuntimeError("the scheduler could not schedule any request; the KV pool or the "
                                           "token budget is smaller than one request needs")
                else:
                    steps = self.scheduler.reserve_burst(sched, self.burst)   # allocates the burst's blocks
                    flat = build_flat_batch(sched.scheduled, self.config.block_size)
                    logit_seqs = [s.seq for s in flat.seqs if s.needs_logits]
                    rng_states = [(seq, seq.generator.get_state()) for seq in logit_seqs
                                  if seq.generator is not None]
            if not sched.is_empty:
                flats, sampled = self._forward(flat, logit_seqs, steps)
        except BaseException:
            with deferred_interrupts():
                if sched is not None:
                    self.block_manager.forget_step_names()
                    self.scheduler.requeue([s.seq for s in sched.scheduled])
                    for seq, state in rng_states:                           # a seeded request draws the same again
                        seq.generator.set_state(state)
                if previous is not None:                                    # the step before is whole: learn it
                    self.in_flight = None
                    self._learn(previous)
            raise
        with deferred_interrupts():
            issued = None
            if not sched.is_empty:
                issued = self._issue(sched, flats, logit_seqs, sampled, clock)
            if self.lag == 0:
                learn, self.in_flight = issued, None
            else:
                learn, self.in_flight = previous, issued
            learnt = self._learn(learn) if learn is not None else []
            if issued is not None and issued.snapshot is not None and self.lag and previous is not None:
                fill_fed_ids(issued.snapshot, issued.flats[0], previous.tokens)
            self._drain_if_idle()
        return learnt

    def _drain_if_idle(self) -> None:
        """Every request is done but a step is still in flight (it computed a token for a request that
        then stopped, or was aborted): learn it now, so an idle engine holds no step."""
        if self.in_flight is not None and not self.scheduler.has_unfinished():
            step, self.in_flight = self.in_flight, None
            self._learn(step)

    def _forward(self, flat, logit_seqs, steps: int) -> tuple[list, DeviceSample]:
        """Run the step (``steps`` > 1: a decode burst of that many steps, each laid out from the one
        before) and sample, on the device; each step's tokens are kept there for the next one.
        Returns the flat batches run and the sampled tokens, ``(steps * R,)`` step by step."""
        flats, tokens = [flat], []
        for i in range(steps):
            if i:
                flats.append(next_decode_batch(flats[-1], self.config.block_size))
            if self.tp is None:
                logits, greedy = self.runner.execute(flats[-1])                 # (R, V), (R,) or None
            else:                             # every rank runs the step: a Ctrl-C waits for its end
                with deferred_interrupts():
                    logits, greedy = self.tp.execute(self.runner, flats[-1])    # from rank 0
            sampled = sample(logits, logit_seqs, greedy)                        # on the device
            self.runner.keep_sampled(sampled.tokens)                            # the next step's decode ids
            # a graph's tokens live in a buffer the burst's next step overwrites
            tokens.append(sampled.tokens.clone() if steps > 1 else sampled.tokens)
        if steps > 1:                         # a burst samples greedily, without log-probabilities
            sampled = DeviceSample(torch.cat(tokens), [])                       # (steps * R,)
        return flats, sampled

    def _issue(self, sched, flats, logit_seqs, sampled, clock) -> "InFlightStep":
        """The step's forward and sampling are issued: advance its requests, mark their new tokens
        in flight, retire the ones that reached ``max_tokens`` and start the tokens' copy to the host."""
        clock.stop()
        self.block_manager.name_pending()     # the prefix-cache names of the blocks it fills: beside the device
        steps = len(flats)
        self.scheduler.advance(sched, steps)
        for row, seq in enumerate(logit_seqs):
            seq.num_in_flight += steps
            seq.feed_row = row
        retired = self.scheduler.retire_at_length(logit_seqs)
        snapshot = None
        if self.snapshots is not None:
            snapshot = take_snapshot(self.num_steps, sched, flats[0], self.block_manager, retired, [], 0.0,
                                     self.scheduler.running)
            self.snapshots.append(snapshot)
        self.num_steps += steps
        host = sampled.copy_to_host()
        counted = [self.ledger.count(flat) for flat in flats]     # beside the device, like the names above
        return InFlightStep(flats, logit_seqs, host, clock, snapshot, counted)

    def _learn(self, step: "InFlightStep") -> list[tuple[Sequence, int]]:
        """Read an issued step's tokens (waiting for their copy), append them, apply the stop rules,
        record the step in the ledger (and its snapshot). A token of a request that finished or was
        aborted meanwhile is discarded."""
        tokens, logprobs = step.host.read()
        R = len(step.logit_seqs)
        step.tokens = tokens[len(tokens) - R:]   # the last step's: what fed the next step's decode rows
        now = time.perf_counter()
        learnt, finished = [], []
        for i in range(0, len(tokens), max(R, 1)):   # a burst's steps in order (none: a chunk that samples nothing)
            for seq, token, lp in zip(step.logit_seqs, tokens[i:i + R], logprobs[i:i + R]):
                seq.num_in_flight -= 1
                if seq.is_finished:              # stopped by an earlier token, or aborted
                    continue
                seq.append_token(token, now, lp)
                learnt.append((seq, token))
                if seq.is_finished:
                    finished.append(seq)
        self.scheduler.drop_finished(finished)
        seconds = step.clock.seconds()
        for rec in step.counted:                 # a burst's steps share its measured time equally
            self.ledger.add(rec, seconds / len(step.counted))
        if step.snapshot is not None:
            step.snapshot.sampled = {seq.request_id: tok for seq, tok in learnt}
            step.snapshot.finished += [q.request_id for q in finished if q.request_id not in step.snapshot.finished
                                       and not q.last_token_in_flight]
            step.snapshot.seconds = seconds
        return learnt


@dataclass
class InFlightStep:
    """A step issued to the device whose tokens the host has not read yet."""

    flats: list                      # its FlatBatch (batch.py); a decode burst's, one a step
    logit_seqs: list[Sequence]       # the sequences of its logit rows, in row order
    host: HostSample                 # the tokens on their way to the host
    clock: "StepClock"
    snapshot: StepSnapshot | None
    counted: list                    # its steps' ledger records (metrics.Ledger.count), timed when read
    tokens: list[int] | None = None  # its (last step's) tokens, once read


class StepClock:
    """How long a step took, from the start of the call that issued it until its tokens were ready:
    host time on the CPU (the forward runs inside the call), CUDA events on a GPU (the device may
    still be busy with the step before when this one starts: the start event then fires when the
    device reaches it, so a step's time is its own, not the one it overlapped)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0, self.t1 = time.perf_counter(), None

    def stop(self) -> None:
        if self.cuda:
            self.end.record()
        else:
            self.t1 = time.perf_counter()

    def seconds(self) -> float:
        """Once the step's tokens have been read (its end event has passed)."""
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return self.t1 - self.t0


def fill_fed_ids(snapshot: StepSnapshot, flat, previous_tokens: list[int]) -> None:
    """Write into a snapshot the ids its decode rows took on the device (batch.py's feed_rows), once
    the host has read them: the snapshot then shows every row's real input id."""
    for row in map(int, flat.feed_rows.nonzero()[0]):
        snapshot.input_ids[row] = previous_tokens[int(flat.feed_rows[row]) - 1]


@contextlib.contextmanager
def deferred_interrupts():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise it when the block is done, so
    the bookkeeping inside is never left half-made. Only the main thread receives signals; in any
    other thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    # _signal.signal is what signal.signal calls, less its enum conversions: 1 µs instead of ~16, and
    # every engine step enters this block twice
    previous = _signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        _signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous):
            previous(signal.SIGINT, None)          # Python's handler (or Jupyter's) raises KeyboardInterrupt
        else:
            raise KeyboardInterrupt
