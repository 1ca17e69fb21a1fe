"""The engine loop: add requests, then ``step()`` until none is left.

One step = the scheduler picks tokens → the flat batch is laid out (batch.py) → the runner runs
the model → the sampler picks one token per logit row → requests advance, finished ones free
their blocks → the ledger (and, when on, the snapshot list) records the step. A prefill and a
decode are the same step at different shapes.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import weakref

import torch

from ..errors import ConfigError
from ..model import GPT
from .batch import build_flat_batch
from .block_manager import BlockManager
from .config import EngineConfig
from .kv_cache import plan_num_blocks
from .metrics import Ledger
from .runner import build_runner
from .sampler import sample
from .scheduler import Scheduler
from .sequence import SamplingParams, Sequence, check_request
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

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (nothing to do with one rank); later steps raise."""
        if self.tp is not None:
            self.tp.shutdown()

    # ------------------------------------------------------------------ requests
    def check_request(self, prompt_token_ids, params: SamplingParams) -> list[int]:
        """The prompt as a list of ids, or :class:`~course_lib.errors.InputError` saying why it cannot be served."""
        return check_request(prompt_token_ids, params, self.model_config, self.config, self.num_kv_blocks)

    def add_request(self, prompt_token_ids, params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        params = params or SamplingParams()
        return self.enqueue(self.check_request(prompt_token_ids, params), params, request_id)

    def enqueue(self, ids: list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        """Queue a request that :meth:`check_request` has already accepted."""
        seq = Sequence(ids, params, eos_token_id=self.model_config.eos_token_id, request_id=request_id or "")
        if params.seed is not None:      # the request's own random stream: independent of its batch
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a request wherever it is; its blocks go back to the pool."""
        self.scheduler.abort(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[tuple[Sequence, int]]:
        """Run one engine step; returns ``(sequence, new token)`` for every token sampled.

        A step either happens whole or leaves no trace: scheduling and the final bookkeeping are
        never cut in half by Ctrl-C (the interrupt is held until they are done), and any exception
        in between — an interrupt or out-of-memory error in the forward pass, a failure while
        sampling — sends the step's requests back to the front of the queue with no blocks, and
        forgets the prefix-cache names of blocks whose K/V were never written. The next step
        recomputes them, exactly. With tensor parallelism a Ctrl-C also waits for the forward to end
        on every rank; a failed rank stops the engine (tensor_parallel.py)."""
        if self.tp is not None:
            self.tp.check_usable()
        t0 = time.perf_counter()
        sched, rng_states = None, []
        try:
            with deferred_interrupts():       # a Ctrl-C here is raised once scheduling is whole, then undone below
                sched = self.scheduler.schedule()
                if sched.is_empty:
                    if self.scheduler.has_unfinished():
                        raise RuntimeError("the scheduler could not schedule any request; the KV pool or the "
                                           "token budget is smaller than one request needs")
                    return []
                flat = build_flat_batch(sched.scheduled, self.config.block_size)
                logit_seqs = [s.seq for s in flat.seqs if s.needs_logits]
                rng_states = [(seq, seq.generator.get_state()) for seq in logit_seqs if seq.generator is not None]
            if self.tp is None:
                logits = self.runner.execute(flat)                          # (R, V)
            else:                             # every rank runs the step: a Ctrl-C waits for its end
                with deferred_interrupts():
                    logits = self.tp.execute(self.runner, flat)             # (R, V), from rank 0
            tokens, logprobs = sample(logits, logit_seqs)
        except BaseException:
            if sched is not None:
                with deferred_interrupts():
                    self.block_manager.forget_step_names()
                    self.scheduler.requeue([s.seq for s in sched.scheduled])
                    for seq, state in rng_states:                           # a seeded request draws the same again
                        seq.generator.set_state(state)
            raise
        with deferred_interrupts():
            now = time.perf_counter()
            for seq, token, lp in zip(logit_seqs, tokens, logprobs):
                seq.append_token(token, now, lp)
            finished = self.scheduler.finish_step(sched)
            self.ledger.add(flat, now - t0)
            sampled = list(zip(logit_seqs, tokens))
            if self.snapshots is not None:
                self.snapshots.append(take_snapshot(self.num_steps, sched, flat, self.block_manager, finished,
                                                    sampled, now - t0, self.scheduler.running))
            self.num_steps += 1
        return sampled


@contextlib.contextmanager
def deferred_interrupts():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise it when the block is done, so
    the bookkeeping inside is never left half-made. Only the main thread receives signals; in any
    other thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous):
            previous(signal.SIGINT, None)          # Python's handler (or Jupyter's) raises KeyboardInterrupt
        else:
            raise KeyboardInterrupt
