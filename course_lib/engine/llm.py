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

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .. import checkpoint
from ..errors import ConfigError, InputError
from ..model import GPT
from ..tokenizer import Tokenizer
from .engine import LLMEngine
from .metrics import RequestMetrics, request_metrics
from .sequence import SamplingParams, Sequence

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
#: what the engine runs on each device type (weights, activations and KV cache in this dtype)
SUPPORTED_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16),
                    "cuda": (torch.float32, torch.bfloat16, torch.float16)}
DEFAULT_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a torch device ({e}); use 'cpu' or 'cuda'") from None
    if device.type not in SUPPORTED_DTYPES:
        raise ConfigError(f"device type {device.type!r} is not supported; use 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use device='cpu'")
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return DEFAULT_DTYPE[device.type]
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is unknown; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype must be a torch.dtype or a name like 'bfloat16', got {dtype!r}")
    if dtype not in SUPPORTED_DTYPES[device.type]:
        raise ConfigError(f"dtype {dtype} cannot run on {device.type}: the engine supports "
                          f"{[str(d) for d in SUPPORTED_DTYPES[device.type]]} there")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bfloat16 support; use dtype='float16' or 'float32'")
    return dtype


def load_model(model, device: torch.device, dtype: torch.dtype) -> tuple[GPT, Tokenizer | None]:
    """``"tiny"``, a GPT, or a checkpoint directory → (GPT on device in dtype, tokenizer or None)."""
    if isinstance(model, GPT):
        return model.to(device=device, dtype=dtype).eval(), None
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
    def __init__(self, model="tiny", device=None, dtype=None, block_size: int = 16,
                 max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None,
                 num_kv_blocks: int | None = None, gpu_memory_fraction: float | None = None,
                 enable_chunked_prefill: bool = True, enable_prefix_caching: bool = True,
                 snapshot: bool = False, tokenizer: Tokenizer | None = None, attention: str | None = None,
                 cuda_graphs: bool | str | None = None, peak_flops: float | None = None,
                 peak_bandwidth: float | None = None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, own_tokenizer = load_model(model, self.device, self.dtype)
        self.tokenizer = tokenizer or own_tokenizer
        self.engine = LLMEngine(
            self.model, block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs, num_kv_blocks=num_kv_blocks, gpu_memory_fraction=gpu_memory_fraction,
            enable_chunked_prefill=enable_chunked_prefill, enable_prefix_caching=enable_prefix_caching,
            snapshot=snapshot, attention=attention, cuda_graphs=cuda_graphs, peak_flops=peak_flops,
            peak_bandwidth=peak_bandwidth)

    @property
    def config(self):
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
            return self.tokenizer.encode(prompt)
        return prompt

    def _requests(self, prompts, sampling_params) -> list[tuple[list[int], SamplingParams]]:
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
            except InputError as e:
                raise type(e)(f"prompt {i}: {e}") from None
            requests.append((ids, p))
        return requests

    def _text(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else None

    # ------------------------------------------------------------------ outputs
    def stream(self, prompts, sampling_params=None) -> Iterator[StreamEvent]:
        """Yield each new token of every request as soon as it is sampled."""
        requests = self._requests(prompts, sampling_params)
        seqs = [self.engine.enqueue(ids, p) for ids, p in requests]     # checked by _requests
        index = {id(s): i for i, s in enumerate(seqs)}
        try:
            while any(not s.is_finished for s in seqs):
                for seq, token in self.engine.step():
                    if id(seq) in index:
                        yield StreamEvent(index[id(seq)], seq.request_id, token, self._text([token]),
                                          seq.is_finished, seq.finish_reason)
        finally:                                         # a stream left early: free its requests
            for s in seqs:
                if not s.is_finished:
                    self.engine.abort(s)
        self.last_sequences = seqs      # the engine-side state of the last call (metrics.throughput reads it)

    def generate(self, prompts, sampling_params=None) -> list[RequestOutput]:
        """Run every prompt to the end; outputs in the order of ``prompts``."""
        for _ in self.stream(prompts, sampling_params):
            pass
        return [self._output(i, s) for i, s in enumerate(self.last_sequences)]

    def _output(self, i: int, seq: Sequence) -> RequestOutput:
        return RequestOutput(i, seq.request_id, list(seq.prompt_token_ids), seq.output_token_ids,
                             self._text(seq.output_token_ids), seq.finish_reason, request_metrics(seq),
                             seq.logprobs if seq.params.logprobs else None)
