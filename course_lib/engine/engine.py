"""The engine loop: add requests, then ``step()`` until none is left.

One step = the scheduler picks tokens → the flat batch is laid out (batch.py) → the runner runs
the model → the sampler picks one token per logit row → requests advance, finished ones free
their blocks → the ledger (and, when on, the snapshot list) records the step. A prefill and a
decode are the same step at different shapes.
"""

from __future__ import annotations

import math
import time

import torch

from ..errors import ConfigError
from ..model import GPT
from .attention import make_attention
from .batch import build_flat_batch
from .block_manager import BlockManager
from .config import EngineConfig
from .kv_cache import PagedKVCache, plan_num_blocks
from .metrics import Ledger
from .runner import ModelRunner
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
        cuda = self.device.type == "cuda"
        self.kv_cache = PagedKVCache(cfg, self.num_kv_blocks, config.block_size, config.dtype, config.device,
                                     triton_write=cuda and config.attention == "triton")
        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens, config.max_num_seqs,
                                   config.enable_chunked_prefill)
        self.runner = ModelRunner(model, self.kv_cache, make_attention(config.attention))
        self.ledger = Ledger(cfg, self.kv_cache.pool.element_size(), config.peak_flops, config.peak_bandwidth)
        self.snapshots: list[StepSnapshot] | None = [] if config.snapshot else None
        self.num_steps = 0
        if config.cuda_graphs:
            from .step_graphs import StepGraphs

            self.runner.step_graphs = StepGraphs(self.runner, config.max_num_batched_tokens, config.max_num_seqs,
                                                 math.ceil(cfg.n_positions / config.block_size))
            self.runner.step_graphs.capture()

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
        """Run one engine step; returns ``(sequence, new token)`` for every token sampled."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler could not schedule any request; the KV pool or the "
                                   "token budget is smaller than one request needs")
            return []
        flat = build_flat_batch(sched.scheduled, self.config.block_size)
        logits = self.runner.execute(flat)                                  # (R, V)
        logit_seqs = [s.seq for s in flat.seqs if s.needs_logits]
        tokens = sample(logits, logit_seqs)
        now = time.perf_counter()
        for seq, token in zip(logit_seqs, tokens):
            seq.append_token(token, now)
        finished = self.scheduler.finish_step(sched)
        self.ledger.add(flat, now - t0)
        sampled = list(zip(logit_seqs, tokens))
        if self.snapshots is not None:
            self.snapshots.append(take_snapshot(self.num_steps, sched, flat, self.block_manager, finished,
                                                sampled, now - t0, self.scheduler.running))
        self.num_steps += 1
        return sampled
