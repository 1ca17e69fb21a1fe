"""The public API: ``LLM(model).generate(prompts, SamplingParams(...))``.

>>> from course_lib.engine import LLM, SamplingParams
>>> llm = LLM("tiny")                                  # the course's model, on CPU or GPU
>>> out = llm.generate(["def ", "The "], SamplingParams(max_tokens=20))
>>> out[0].text, out[0].metrics.ttft
>>> for event in llm.stream("import ", SamplingParams(max_tokens=5)):
...     print(event.text, end="")

``model`` is ``"tiny"``, a :class:`course_lib.model.GPT`, or a checkpoint directory in HF GPT-2
format (``config.json`` + ``model.safetensors``, any size). Text prompts need a tokenizer (the
course's own for ``"tiny"``, or ``tokenizer=``); token-id lists work with every model.
Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .. import checkpoint
from ..errors import ConfigError, CourseError, InputError
from ..model import GPT
from ..tokenizer import Tokenizer, normalize
from .config import EngineConfig
from .engine import LLMEngine
from .metrics import RequestMetrics, request_metrics
from .sequence import CheckedPrompt, SamplingParams, Sequence


def load_model(model, device: torch.device, dtype: torch.dtype) -> tuple[GPT, Tokenizer | None]:
    """``"tiny"``, a GPT, or a checkpoint directory → (GPT on device in dtype, tokenizer or None).

    A GPT the caller passes is left as it was (device, dtype, train/eval mode): the engine runs a
    module of its own that shares the caller's weight tensors when they already have the right
    device and dtype, and converted copies otherwise."""
    if isinstance(model, GPT):
        return _inference_copy(model, device, dtype), None
    if isinstance(model, str) and model == "tiny":
        from ..tiny import load_tiny

        return load_tiny(device=device, dtype=dtype)
    if isinstance(model, (str, Path)):
        gpt = checkpoint.load(model, device=device, dtype=dtype)
        tok_path = Path(model) / "tokenizer.json"
        tokenizer = None
        if tok_path.is_file():
            try:
                tokenizer = Tokenizer.load(tok_path)
            except Exception:     # an HF tokenizer.json: not ours; token-id prompts still work
                tokenizer = None
        return gpt, tokenizer
    raise ConfigError(f"model must be 'tiny', a checkpoint directory or a course_lib GPT, got {type(model).__name__}")


def _inference_copy(model: GPT, device: torch.device, dtype: torch.dtype) -> GPT:
    state = {k: v.detach().to(device=device, dtype=dtype) for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    return checkpoint.from_state(model.config, state)


def check_weights(model: GPT, dtype: torch.dtype) -> None:
    """Every weight finite in the dtype the engine runs: NaN or infinite weights (a diverged
    training run, values beyond float16's range of 65504) would give garbage with no error."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ConfigError(f"weight {name} has NaN or infinite values in {str(dtype).replace('torch.', '')}"
                              + (" (its values exceed float16's range: use dtype='bfloat16' or 'float32')"
                                 if dtype == torch.float16 else "; the model is damaged"))


@dataclass
class RequestOutput:
    index: int                      # position in the prompts list
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]            # generated tokens
    text: str | None                # decoded generated tokens (when there is a tokenizer)
    finish_reason: str              # "length", "stop" or "abort"
    metrics: RequestMetrics
    logprobs: list[dict[int, float]] | None = None   # per token {token id: log-prob}, with SamplingParams(logprobs=k)


@dataclass
class StreamEvent:
    index: int
    request_id: str
    token_id: int
    text: str | None                # this token's text
    finished: bool
    finish_reason: str | None


class LLM:
    """``LLM(model, **options)``: ``options`` are the fields of :class:`EngineConfig` (device, dtype,
    block_size, num_kv_blocks, ...), or pass ``config=EngineConfig(...)``."""

    def __init__(self, model="tiny", tokenizer: Tokenizer | None = None, config: EngineConfig | None = None,
                 **options):
        unknown = sorted(set(options) - set(EngineConfig.field_names()))
        if unknown:
            raise ConfigError(f"unknown engine option(s) {unknown}; the options are {EngineConfig.field_names()}")
        if config is not None and options:
            raise ConfigError("give config=EngineConfig(...) or keyword options, not both")
        config = (config or EngineConfig(**options)).resolve_device_and_dtype()
        self.device, self.dtype = config.device, config.dtype
        self.model, own_tokenizer = load_model(model, self.device, self.dtype)
        check_weights(self.model, self.dtype)
        self.tokenizer = tokenizer or own_tokenizer
        if self.tokenizer is not None and self.tokenizer.vocab_size != self.model.config.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocabulary has "
                              f"{self.model.config.vocab_size}: they do not belong together; pass the model's own "
                              "tokenizer, or prompts as token ids")
        self.engine = LLMEngine(self.model, config)
        self._step_lock = threading.RLock()          # one step at a time, whoever drives it
        self._longest_token = None

    def shutdown(self) -> None:
        """Stop the engine's tensor-parallel worker processes (also done at garbage collection and
        at exit); later steps then raise. With one rank there is nothing to stop."""
        with self._step_lock:
            self.engine.shutdown()

    @property
    def config(self):
        """The model's :class:`~course_lib.config.GPTConfig` (the engine's settings: ``llm.engine.config``)."""
        return self.model.config

    @property
    def snapshots(self):
        return self.engine.snapshots

    @property
    def ledger(self):
        return self.engine.ledger

    # ------------------------------------------------------------------ inputs
    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError("this model has no tokenizer: pass prompts as lists of token ids "
                                 "(or give LLM(..., tokenizer=...))")
            if not prompt:
                raise InputError("the prompt is empty; give at least one token")
            fewest = self._fewest_tokens(prompt)
            if fewest > self.model.config.n_positions:     # said before any encoding work is done
                raise InputError(f"a prompt of {len(prompt):,} characters is at least {fewest:,} tokens, longer than "
                                 f"the model's context of n_positions={self.model.config.n_positions}; shorten it")
            return self.tokenizer.encode(prompt)
        return prompt

    def _fewest_tokens(self, text: str) -> int:
        """A lower bound on the tokens of ``text``: no token spells more characters than the longest."""
        vocab = getattr(self.tokenizer, "id_to_token", None)
        if vocab is None:
            return 0
        if self._longest_token is None:
            self._longest_token = max(len(t) for t in vocab)
        return -(-len(normalize(text)) // self._longest_token)

    def _requests(self, prompts, sampling_params) -> list[tuple[CheckedPrompt, SamplingParams]]:
        if isinstance(prompts, (str, torch.Tensor)) or (
                isinstance(prompts, (list, tuple)) and prompts and not isinstance(prompts[0], (str, list, tuple))):
            prompts = [prompts]                         # one prompt: text or a flat list of ids
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InputError("give a prompt (text or token ids) or a non-empty list of prompts")
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise InputError(f"{len(params)} sampling params for {len(prompts)} prompts; give one or one each")
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                ids = self.engine.check_request(self._encode(prompt), p)   # all checked before any runs
            except CourseError as e:                   # a bad id, length, parameter or character
                raise type(e)(f"prompt {i}: {e}") from None
            requests.append((ids, p))
        return requests

    def _text(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else None

    # ------------------------------------------------------------------ outputs
    def _run(self, requests, events: bool = True) -> Iterator[tuple[list[Sequence], StreamEvent | None]]:
        """Queue the requests and step until all are done, yielding each new token's event (with
        ``events=False`` only the final ``(seqs, None)``: ``generate`` reads the whole outputs, and
        a per-token event, decoded to text, costs more host time than a GPU decode step).

        Events are read off the requests' own tokens, not off what a step returns: another consumer
        of this LLM (a second stream, a ``generate`` while a stream is open, another thread) may run
        the steps that produce them, and every consumer still sees all of its own tokens, in order,
        each request's last one marked finished."""
        seqs: list[Sequence] = []
        try:
            with self._step_lock:                        # never while another thread steps the engine
                for ids, p in requests:                  # checked by _requests; all or none stay queued
                    seqs.append(self.engine.enqueue(ids, p))
            sent = [0] * len(seqs)
            while True:
                for i, seq in enumerate(seqs if events else ()):
                    while sent[i] < seq.num_output_tokens:
                        token = seq.token_ids[seq.num_prompt_tokens + sent[i]]
                        sent[i] += 1
                        last = seq.is_finished and sent[i] == seq.num_output_tokens
                        yield seqs, StreamEvent(i, seq.request_id, token, self._text([token]), last,
                                                seq.finish_reason if last else None)
                if all(s.is_finished for s in seqs):
                    break
                with self._step_lock:
                    if not all(s.is_finished for s in seqs):
                        self.engine.step()
            yield seqs, None
        finally:                                         # left early, or an error: free what is left
            with self._step_lock:
                for s in seqs:
                    if not s.is_finished:
                        self.engine.abort(s)

    def stream(self, prompts, sampling_params=None) -> Iterator[StreamEvent]:
        """Yield each new token of every request as soon as it is sampled."""
        for _, event in self._run(self._requests(prompts, sampling_params)):
            if event is not None:
                yield event

    def generate(self, prompts, sampling_params=None) -> list[RequestOutput]:
        """Run every prompt to the end; outputs in the order of ``prompts``."""
        for seqs, _ in self._run(self._requests(prompts, sampling_params), events=False):
            pass
        return [self._output(i, s) for i, s in enumerate(seqs)]

    def _output(self, i: int, seq: Sequence) -> RequestOutput:
        # the sequence's own prompt list, not a copy: the engine is done with it, and a copy of a long
        # prompt touches every id object (cold in the cache after the step: ~30 µs per 1,024)
        return RequestOutput(i, seq.request_id, seq.prompt_token_ids, seq.output_token_ids,
                             self._text(seq.output_token_ids), seq.finish_reason, request_metrics(seq),
                             seq.logprobs if seq.params.logprobs else None)
