"""Requests and their state: :class:`SamplingParams`, :class:`Sequence`, and :func:`check_request`
(which hands back a :class:`CheckedPrompt`).

A sequence carries everything the engine knows about one request: the prompt, the tokens
generated so far, how many of those tokens already have K/V in the paged cache
(``num_computed_tokens``), and the KV blocks that hold them (``block_table``).

The scheduler needs only one number per request: ``num_tokens - num_computed_tokens``, the tokens
that still want computing. For a fresh prompt that is the whole prompt (prefill), during
generation it is 1 (the token sampled last; decode). Prefill and decode are the same computation.
Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

import array
import enum
import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import GPTConfig
from ..errors import InputError


@dataclass
class SamplingParams:
    """How to pick each new token of one request, and when to stop.

    ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` mean no filtering.
    ``seed`` makes one request's sampling reproducible whatever else is in the batch.
    Generation stops after ``max_tokens`` tokens, at the model's end-of-text token (unless
    ``ignore_eos``) or at any of ``stop_token_ids``.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0          # also return the log-probabilities of this many top tokens per step

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InputError` for a parameter no sampler can honour."""
        m = self.max_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise InputError(f"max_tokens must be a positive integer, got {m!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise InputError(f"top_p must be in (0, 1] (1 means no nucleus filtering), got {p!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError(f"top_k must be a non-negative integer (0 means no limit), got {k!r}")
        lp = self.logprobs
        if isinstance(lp, bool) or not isinstance(lp, int) or lp < 0:
            raise InputError(f"logprobs must be a non-negative integer (0: none), got {lp!r}")
        sd = self.seed
        if sd is not None and (isinstance(sd, bool) or not isinstance(sd, int) or not 0 <= sd < 2**64):
            raise InputError(f"seed must be an integer in 0..2**64-1 or None, got {sd!r}")
        stop = self.stop_token_ids
        if isinstance(stop, (str, bytes)) or not isinstance(stop, (list, tuple, set, frozenset)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in stop):
            raise InputError(f"stop_token_ids must be a list of non-negative integer token ids, got {stop!r}")
        self.stop_token_ids = tuple(stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # in the queue: never scheduled, or preempted (its KV was dropped)
    RUNNING = "running"      # holds KV blocks and gets tokens computed every step
    FINISHED = "finished"    # done; its blocks are back in the pool


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request: prompt + generated tokens, and how far the KV cache has got.

    ``token_ids`` is the prompt followed by the output. ``num_computed_tokens`` of them have their
    K/V in the blocks of ``block_table``; the rest are what the next steps must compute.
    """

    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None = None
    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)   # names of its full blocks
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_cached_prompt_tokens: int = 0   # tokens found in the prefix cache at first scheduling
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    # asynchronous scheduling (engine.py): tokens sampled on the device whose value the host has not
    # read yet (1, or 2 for the moment between launching a step and learning the one before), the
    # logit row of the latest one in its step (which feeds this request's next decode row), and
    # whether that latest token is its last by length (then it is never scheduled again)
    num_in_flight: int = 0
    feed_row: int = -1
    last_token_in_flight: bool = False
    # timestamps (time.perf_counter) for the request metrics
    arrival_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)   # per output token, when asked
    finish_time: float | None = None

    # the prompt as an int64 array (P,), read-only: the flat batch copies prompt ids from it
    # without a Python loop (check_request made it; built here for a Sequence made by hand)
    prompt_array: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        self.seq_id = next(_ids)
        if not self.request_id:
            self.request_id = str(self.seq_id)
        self.token_ids = list(self.prompt_token_ids)
        if self.prompt_array is None:
            self.prompt_array = np.fromiter(self.prompt_token_ids, dtype=np.int64, count=len(self.prompt_token_ids))
            self.prompt_array.flags.writeable = False
        assert len(self.prompt_array) == len(self.prompt_token_ids), "prompt_array is not this prompt"

    # ------------------------------------------------------------------ sizes
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens without K/V yet: the whole prompt before prefill, 1 during decode (the token sampled
        last, which may still be in flight on the device)."""
        return self.num_tokens + self.num_in_flight - self.num_computed_tokens

    @property
    def reaches_max_tokens(self) -> bool:
        """Its tokens known and in flight reach ``max_tokens``: a length stop the host knows without
        reading the last token (``check_request`` keeps prompt + max_tokens within the context)."""
        return self.num_output_tokens + self.num_in_flight >= self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    # ------------------------------------------------------------------ updates
    def append_token(self, token_id: int, now: float, logprobs: dict[int, float] | None = None) -> None:
        """Add a sampled token and decide whether the request is done."""
        self.token_ids.append(token_id)
        self.token_times.append(now)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        p = self.params
        if not p.ignore_eos and self.eos_token_id is not None and token_id == self.eos_token_id:
            self.finish("stop", now)
        elif token_id in p.stop_token_ids:
            self.finish("stop", now)
        elif self.num_output_tokens >= p.max_tokens:
            self.finish("length", now)

    def finish(self, reason: str, now: float) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.finish_time = now


@dataclass(frozen=True, eq=False)
class CheckedPrompt:
    """A prompt that :func:`check_request` accepted: its ids as a list, and as the int64 array (P,)
    the check made of them (kept, so that no later step converts the list again)."""

    ids: list[int]
    array: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def check_request(prompt_token_ids, params: SamplingParams, model: GPTConfig, engine_config,
                  num_kv_blocks: int) -> CheckedPrompt:
    """The prompt's ids (:class:`CheckedPrompt`), or :class:`InputError` saying why the engine
    cannot serve it: ids outside the vocabulary, more tokens than the context, a request larger than
    the KV pool or (chunked prefill off) than one step's token budget."""
    if not isinstance(params, SamplingParams):
        raise InputError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
    params.validate()
    if isinstance(prompt_token_ids, torch.Tensor):
        prompt_token_ids = prompt_token_ids.tolist()
    if not isinstance(prompt_token_ids, (list, tuple)):
        raise InputError("a prompt must be a string or a list of integer token ids")
    if not prompt_token_ids:
        raise InputError("the prompt is empty; give at least one token")
    integers = "a prompt must be a string or a list of integer token ids"
    try:        # one C loop: array('q') takes ints (and numpy integers), refuses floats, strings, nesting
        packed = array.array("q", prompt_token_ids)
    except OverflowError:                   # an int beyond 64 bits
        if all(isinstance(i, int) and not isinstance(i, bool) for i in prompt_token_ids):
            big = max(prompt_token_ids, key=abs)
            raise InputError(f"token id {big} is out of range: this model's vocabulary has ids "
                             f"0..{model.vocab_size - 1}") from None
        raise InputError(integers) from None
    except TypeError:
        raise InputError(integers) from None
    arr = np.frombuffer(packed, dtype=np.int64)                      # (P,) the same memory
    if any(isinstance(prompt_token_ids[i], (bool, np.bool_)) for i in np.flatnonzero(arr <= 1).tolist()):
        raise InputError(integers)          # True and False pack as 1 and 0: only those places are looked at
    ids = packed.tolist()
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= model.vocab_size:
        raise InputError(f"token id {lo if lo < 0 else hi} is out of range: this model's vocabulary has ids "
                         f"0..{model.vocab_size - 1}")
    if len(ids) > model.n_positions:
        raise InputError(f"prompt of {len(ids)} tokens is longer than the model's context of "
                         f"n_positions={model.n_positions}; shorten it")
    if len(ids) + params.max_tokens > model.n_positions:
        raise InputError(f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} exceeds the "
                         f"context of n_positions={model.n_positions}; ask for at most "
                         f"{model.n_positions - len(ids)} tokens")
    beyond = [i for i in params.stop_token_ids if i >= model.vocab_size]
    if beyond:
        raise InputError(f"stop token id {beyond[0]} is out of range: this model's vocabulary has ids "
                         f"0..{model.vocab_size - 1}")
    need_tokens = len(ids) + params.max_tokens - 1          # the last sampled token is never fed back
    bs = engine_config.block_size
    need = -(-need_tokens // bs)
    if need > num_kv_blocks:
        raise InputError(f"the KV pool is too small for this request: it needs {need} blocks of "
                         f"{bs} tokens ({need_tokens} tokens) but the pool has "
                         f"{num_kv_blocks}; pass a larger num_kv_blocks or "
                         "gpu_memory_fraction, or ask for fewer tokens")
    if not engine_config.enable_chunked_prefill and need_tokens > engine_config.max_num_batched_tokens:
        raise InputError(f"with chunked prefill off a request must fit in one step: it needs "
                         f"{need_tokens} tokens but max_num_batched_tokens={engine_config.max_num_batched_tokens}; "
                         "raise the budget or turn chunked prefill on")
    arr.flags.writeable = False
    return CheckedPrompt(ids, arr)
