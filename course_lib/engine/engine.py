"""The engine loop: add requests, then ``step()`` until none is left.

One step = the scheduler picks tokens → the runner builds the flat batch and runs the model →
the sampler picks one token per finished row → sequences advance, finished ones free their
blocks → the ledger (and, when on, the snapshot list) records the step.
Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

import gc
import math
import time

import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..model import GPT
from .attention import make_backend
from .block_manager import BlockManager
from .kv_cache import PagedKVCache, kv_bytes_per_block
from .metrics import Ledger
from .runner import ModelRunner
from .sampler import sample
from .scheduler import Scheduler
from .sequence import SamplingParams, Sequence
from .snapshot import StepSnapshot, take_snapshot

CPU_DEFAULT_KV_BYTES = 256 * 2**20     # default pool cap on CPU


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


class LLMEngine:
    def __init__(self, model: GPT, *, block_size: int = 16, max_num_batched_tokens: int | None = None,
                 max_num_seqs: int | None = None, num_kv_blocks: int | None = None,
                 gpu_memory_fraction: float | None = None, enable_chunked_prefill: bool = True,
                 enable_prefix_caching: bool = True, snapshot: bool = False, attention: str | None = None,
                 cuda_graphs: bool | str | None = None, peak_flops: float | None = None,
                 peak_bandwidth: float | None = None):
        self.model = model.eval()
        self.config = cfg = model.config
        weight = model.transformer.wte.weight
        self.device, self.dtype = weight.device, weight.dtype
        cuda = self.device.type == "cuda"
        self.block_size = _positive_int("block_size", block_size)
        self.max_num_seqs = _positive_int(
            "max_num_seqs", (256 if cuda else 64) if max_num_seqs is None else max_num_seqs)
        self.max_num_batched_tokens = _positive_int(
            "max_num_batched_tokens", max(8192 if cuda else 2048, cfg.n_positions)
            if max_num_batched_tokens is None else max_num_batched_tokens)
        self.enable_chunked_prefill = bool(enable_chunked_prefill)

        num_blocks = self._num_blocks(num_kv_blocks, gpu_memory_fraction)
        self.kv_cache = PagedKVCache(cfg, num_blocks, self.block_size, self.dtype, self.device)
        self.block_manager = BlockManager(num_blocks, self.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.max_num_batched_tokens, self.max_num_seqs,
                                   self.enable_chunked_prefill)
        if cuda_graphs not in (None, True, False, "full"):
            raise ConfigError(f"cuda_graphs must be True, False, None (automatic) or 'full', got {cuda_graphs!r}")
        if attention is None and cuda:   # the fastest backend the graph mode allows
            from .attention import triton_available

            if not triton_available():
                attention = "sdpa"
            else:   # whole-step graphs need the unified kernel; decode-only graphs or eager use the decode kernel
                attention = "triton-unified" if cuda_graphs in (None, "full") else "triton"
        backend = make_backend(attention, self.device)
        self.kv_cache.use_triton = backend.name in ("triton", "triton-unified")   # the Triton K/V write kernel
        self.runner = ModelRunner(model, self.kv_cache, backend, fast_gelu=cuda)
        self.ledger = Ledger(cfg, self.kv_cache.pool.element_size(), peak_flops, peak_bandwidth)
        self.snapshots: list[StepSnapshot] | None = [] if snapshot else None
        self.num_steps = 0
        if cuda_graphs is None:
            cuda_graphs = cuda and self.runner.attention.graph_safe
            if cuda_graphs and self.runner.attention.needs_tiles:
                cuda_graphs = "full"
        if cuda_graphs == "full":      # every step replays a graph of its token bucket (step_graphs.py)
            if not cuda:
                raise ConfigError("cuda_graphs='full' needs a CUDA device")
            if not self.runner.attention.needs_tiles:
                raise ConfigError(f"cuda_graphs='full' captures attention for whole steps, which only "
                                  f"attention='triton-unified' can do (got {self.runner.attention.name!r})")
            self.runner.capture_step_graphs(self.max_num_batched_tokens, self.max_num_seqs)
        elif cuda_graphs:
            if not cuda:
                raise ConfigError("cuda_graphs=True needs a CUDA device")
            if not self.runner.attention.graph_safe:
                raise ConfigError(f"attention={self.runner.attention.name!r} reads host-side lengths and "
                                  "cannot be captured in a CUDA graph; use 'sdpa' or 'triton', or cuda_graphs=False")
            if self.runner.attention.needs_tiles:
                raise ConfigError("attention='triton-unified' is captured whole steps at a time: use "
                                  "cuda_graphs='full' (or None), or cuda_graphs=False")
            sizes = [b for b in (1, 2, 4, 8) if b <= self.max_num_seqs]
            sizes += list(range(16, min(self.max_num_seqs, 512) + 1, 16))
            self.runner.capture_cuda_graphs(sizes)

    # ------------------------------------------------------------------ sizing
    def _num_blocks(self, num_kv_blocks, fraction) -> int:
        cfg, per_block = self.config, kv_bytes_per_block(self.config, self.block_size, self.dtype)
        if num_kv_blocks is not None and fraction is not None:
            raise ConfigError("give num_kv_blocks or gpu_memory_fraction, not both")
        if num_kv_blocks is not None:
            if isinstance(num_kv_blocks, bool) or not isinstance(num_kv_blocks, int) or num_kv_blocks < 1:
                raise ConfigError(f"num_kv_blocks must be a positive integer, got {num_kv_blocks!r}: "
                                  "the KV pool needs room for at least one request")
            return num_kv_blocks
        if self.device.type != "cuda":
            if fraction is not None:
                raise ConfigError("gpu_memory_fraction needs a CUDA device; on CPU pass num_kv_blocks")
            full = self.max_num_seqs * math.ceil(cfg.n_positions / self.block_size)
            return max(1, min(full, CPU_DEFAULT_KV_BYTES // per_block))
        fraction = 0.9 if fraction is None else fraction
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ConfigError(f"gpu_memory_fraction must be in (0, 1], got {fraction!r}")
        gc.collect()                       # engines dropped but still in reference cycles give memory back
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        elem = torch.empty((), dtype=self.dtype).element_size()
        # room for one step's activations: the widest tensors are the MLP hidden and the logits
        activations = (self.max_num_batched_tokens * (cfg.mlp_dim + 6 * cfg.n_embd) * elem * 4
                       + self.max_num_seqs * cfg.vocab_size * 4 * 4 + 512 * 2**20)
        usable = fraction * total - (total - free) - activations
        blocks = int(usable // per_block)
        if blocks < 1:
            raise ConfigError(f"gpu_memory_fraction={fraction} leaves no memory for the KV cache "
                              f"({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB after the weights); "
                              "raise it, or lower max_num_batched_tokens")
        return blocks

    # ------------------------------------------------------------------ requests
    def check_request(self, prompt_token_ids, params: SamplingParams) -> list[int]:
        """Validate one request; raise :class:`InputError` saying why it cannot be served."""
        cfg = self.config
        if not isinstance(params, SamplingParams):
            raise InputError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        if isinstance(prompt_token_ids, torch.Tensor):
            prompt_token_ids = prompt_token_ids.tolist()
        if not isinstance(prompt_token_ids, (list, tuple)):
            raise InputError("a prompt must be a string or a list of integer token ids")
        if not prompt_token_ids:
            raise InputError("the prompt is empty; give at least one token")
        try:                                    # one vectorised check: thousands of ids in microseconds
            arr = np.asarray(prompt_token_ids)
        except (ValueError, OverflowError):
            arr = None
        if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iu":   # bools, floats, strings, nesting
            raise InputError("a prompt must be a string or a list of integer token ids")
        ids = arr.tolist()
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise InputError(f"token id {lo if lo < 0 else hi} is out of range: this model's vocabulary has ids "
                             f"0..{cfg.vocab_size - 1}")
        if len(ids) > cfg.n_positions:
            raise InputError(f"prompt of {len(ids)} tokens is longer than the model's context of "
                             f"n_positions={cfg.n_positions}; shorten it")
        if len(ids) + params.max_tokens > cfg.n_positions:
            raise InputError(f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} exceeds the "
                             f"context of n_positions={cfg.n_positions}; ask for at most "
                             f"{cfg.n_positions - len(ids)} tokens")
        need_tokens = len(ids) + params.max_tokens - 1
        need = self.block_manager.blocks_needed(need_tokens)
        if need > self.block_manager.num_blocks:
            raise InputError(f"the KV pool is too small for this request: it needs {need} blocks of "
                             f"{self.block_size} tokens ({need_tokens} tokens) but the pool has "
                             f"{self.block_manager.num_blocks}; pass a larger num_kv_blocks or "
                             "gpu_memory_fraction, or ask for fewer tokens")
        if not self.enable_chunked_prefill and need_tokens > self.max_num_batched_tokens:
            raise InputError(f"with chunked prefill off a request must fit in one step: it needs "
                             f"{need_tokens} tokens but max_num_batched_tokens={self.max_num_batched_tokens}; "
                             "raise the budget or turn chunked prefill on")
        return ids

    def add_request(self, prompt_token_ids, params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        params = params or SamplingParams()
        return self.enqueue(self.check_request(prompt_token_ids, params), params, request_id)

    def enqueue(self, ids: list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        """Queue a request that :meth:`check_request` has already accepted."""
        seq = Sequence(ids, params, eos_token_id=self.config.eos_token_id, request_id=request_id or "")
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a request wherever it is; its blocks go back to the pool."""
        if seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        if seq in self.scheduler.running:
            self.scheduler.running.remove(seq)
            self.block_manager.free_sequence(seq)
        if not seq.is_finished:
            seq.finish("abort", time.perf_counter())

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
        batch = self.runner.prepare(sched)
        logits = self.runner.execute(batch)                                 # (R, V)
        logit_seqs = [s.seq for s in batch.seqs if s.needs_logits]
        tokens = sample(logits, logit_seqs)
        now = time.perf_counter()
        for seq, token in zip(logit_seqs, tokens):
            seq.append_token(token, now)
        finished = self.scheduler.finish_step(sched)
        self.ledger.add(batch.query_lens, batch.context_lens_host, len(logit_seqs), now - t0)
        sampled = list(zip(logit_seqs, tokens))
        if self.snapshots is not None:
            self.snapshots.append(take_snapshot(self.num_steps, sched, batch, self.block_manager, finished,
                                                sampled, now - t0, self.scheduler.running))
        self.num_steps += 1
        return sampled

    def run_to_completion(self) -> None:
        while self.has_unfinished():
            self.step()
