"""One configuration for the whole engine: :class:`EngineConfig`.

``LLM``, :class:`~course_lib.engine.engine.LLMEngine` and the command line all take the same
fields. ``EngineConfig(...)`` checks each value's type and range when it is made;
:meth:`EngineConfig.resolve` then fills in what depends on the machine and the model (device,
dtype, batch limits, attention path) and checks that the choices fit together, so every later
layer reads plain, valid values. The KV pool's size is worked out with the pool
(:func:`course_lib.engine.kv_cache.plan_num_blocks`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from ..config import GPTConfig
from ..errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
DEFAULT_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
#: the two attention paths (attention.py): batched torch/SDPA, and the unified Triton kernel
ATTENTION = ("torch", "triton")
#: split-KV cap of the Triton path on CUDA when max_kv_splits is not given (attention_tiles.kv_splits_for)
DEFAULT_MAX_KV_SPLITS = 32
#: decode steps per scheduling of an all-decode greedy batch on CUDA when decode_burst is not given
#: (engine.py): the host then schedules once per 8 decode steps. On an H200 the decode steps were
#: already bound by the device, and took the same time with bursts on and off (benchmarks/NOTES.md)
DEFAULT_DECODE_BURST = 8


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _positive_int(name: str, value, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _flag(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")


def _positive_number(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Every setting of the engine. ``None`` means "pick for this machine" (see :meth:`resolve`).

    * ``device``: ``"cpu"`` or ``"cuda"``; ``dtype``: float32 / bfloat16 / float16 (a name or a torch dtype).
    * ``block_size``: token slots per KV block; ``num_kv_blocks`` or ``gpu_memory_fraction``: the pool's size.
    * ``max_num_batched_tokens``: the token budget of one step; ``max_num_seqs``: requests per step.
    * ``enable_chunked_prefill``: long prompts may be split over steps; ``enable_prefix_caching``:
      full blocks of earlier prompts are reused.
    * ``attention``: ``"torch"`` (batched SDPA, the CPU default) or ``"triton"`` (the unified kernel,
      the CUDA default); ``cuda_graphs``: replay each step as a captured CUDA graph (CUDA + triton).
    * ``max_kv_splits``: split-KV decode attention of the triton path — small steps split each
      sequence's keys over up to this many programs so a batch of 1 fills the GPU; 1 turns it off
      (default: 32 on CUDA, 1 elsewhere).
    * ``fused_kernels``: run the forward through fused Triton kernels (add + LayerNorm, bias + GELU,
      decode GEMVs; fused_forward.py); default on with attention="triton" on CUDA, off on CPU.
    * ``snapshot``: record every step for the glass box (snapshot.py).
    * ``peak_flops``, ``peak_bandwidth``: measured ceilings (FLOP/s, bytes/s) for the ledger's MFU/MBU.
    * ``tensor_parallel_size``: ranks the weights and the KV cache are split over by heads and MLP
      columns (tensor_parallel.py): one process per rank, one GPU each on CUDA, gloo on CPU.
    * ``async_scheduling``: the host prepares step n+1 while the device runs step n, and reads step
      n's tokens one step later (engine.py); ``None`` (the default) means on, except with tensor
      parallelism, whose worker ranks need every step's ids on the host. Off: the same loop with no
      lag. The tokens are the same either way.
    * ``decode_burst``: a step whose rows are all greedy decodes, with nobody waiting, runs up to this
      many decode steps from one scheduling (engine.py): the host lays out each next step by adding
      1 to positions and lengths, and the device feeds each sampled token to the next step. Fewer
      host calls per token; tokens reach the host (and a stream) in groups. 1 turns it off
      (default: 8 on CUDA, 1 elsewhere and with tensor parallelism). The tokens are the same either way.
    """

    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_fraction: float | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    attention: str | None = None
    cuda_graphs: bool | None = None
    fused_kernels: bool | None = None
    snapshot: bool = False
    peak_flops: float | None = None
    peak_bandwidth: float | None = None
    tensor_parallel_size: int = 1
    max_kv_splits: int | None = None
    async_scheduling: bool | None = None
    decode_burst: int | None = None

    def __post_init__(self):
        _positive_int("block_size", self.block_size, optional=False)
        _positive_int("tensor_parallel_size", self.tensor_parallel_size, optional=False)
        _positive_int("num_kv_blocks", self.num_kv_blocks)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_kv_splits", self.max_kv_splits)
        _positive_int("decode_burst", self.decode_burst)
        if self.decode_burst not in (None, 1) and self.tensor_parallel_size > 1:
            raise ConfigError(f"decode_burst={self.decode_burst} cannot be combined with tensor_parallel_size > 1 "
                              "(the worker ranks run one scheduled step at a time); leave it None or set it 1")
        for name in ("enable_chunked_prefill", "enable_prefix_caching", "snapshot"):
            _flag(name, getattr(self, name))
        _flag("cuda_graphs", self.cuda_graphs, optional=True)
        _flag("fused_kernels", self.fused_kernels, optional=True)
        _flag("async_scheduling", self.async_scheduling, optional=True)
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise ConfigError("async_scheduling=True cannot be combined with tensor_parallel_size > 1 (the worker "
                              "ranks read each step's token ids on the host); leave it None or set it False")
        _positive_number("peak_flops", self.peak_flops)
        _positive_number("peak_bandwidth", self.peak_bandwidth)
        f = self.gpu_memory_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1):
            raise ConfigError(f"gpu_memory_fraction must be in (0, 1], got {f!r}")
        if self.num_kv_blocks is not None and f is not None:
            raise ConfigError("give num_kv_blocks or gpu_memory_fraction, not both")
        if self.attention is not None and self.attention not in ATTENTION:
            raise ConfigError(f"unknown attention {self.attention!r}; choose 'torch' (batched SDPA, any device) "
                              "or 'triton' (the unified kernel, CUDA)")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    # ------------------------------------------------------------------ machine-dependent choices
    def resolve_device_and_dtype(self) -> "EngineConfig":
        """A copy with ``device`` and ``dtype`` as checked torch objects (what the model is loaded with)."""
        device = resolve_device(self.device)
        return dataclasses.replace(self, device=device, dtype=resolve_dtype(self.dtype, device))

    def resolve(self, model: GPTConfig) -> "EngineConfig":
        """A copy with device, dtype, batch limits, attention and CUDA graphs decided and checked
        together (``num_kv_blocks`` is decided by the pool, kv_cache.plan_num_blocks)."""
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        cuda = device.type == "cuda"
        attention = self.attention or ("triton" if cuda and triton_available() else "torch")
        if attention == "triton":
            if not triton_available():
                raise ConfigError("attention='triton' needs the triton package (pip install triton); "
                                  "or use attention='torch'")
            if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
                raise ConfigError("attention='triton' needs a CUDA GPU; on CPU use attention='torch' (the default), "
                                  "or set TRITON_INTERPRET=1 before starting Python to run the kernel slowly "
                                  "through Triton's interpreter")
        cuda_graphs = (cuda and attention == "triton") if self.cuda_graphs is None else self.cuda_graphs
        if cuda_graphs and not cuda:
            raise ConfigError("cuda_graphs=True needs a CUDA device; on CPU leave it off")
        if cuda_graphs and attention != "triton":
            raise ConfigError("cuda_graphs=True captures whole steps, which only attention='triton' can do "
                              "(the torch path reads host-side lengths); use attention='triton' or cuda_graphs=False")
        fused = (cuda and attention == "triton") if self.fused_kernels is None else self.fused_kernels
        if fused and attention != "triton":
            raise ConfigError("fused_kernels=True runs Triton kernels, which needs attention='triton' "
                              "(CUDA, or TRITON_INTERPRET=1 on CPU); use attention='triton' or fused_kernels=False")
        if self.gpu_memory_fraction is not None and not cuda:
            raise ConfigError("gpu_memory_fraction needs a CUDA device; on CPU pass num_kv_blocks")
        if attention != "triton" and self.max_kv_splits not in (None, 1):
            raise ConfigError(f"max_kv_splits={self.max_kv_splits} splits the keys of the triton attention kernel; "
                              "use attention='triton' or leave max_kv_splits unset")
        max_kv_splits = self.max_kv_splits or (DEFAULT_MAX_KV_SPLITS if cuda and attention == "triton" else 1)
        check_tensor_parallel(self.tensor_parallel_size, model, device)
        max_num_seqs = self.max_num_seqs or (256 if cuda else 64)
        budget = self.max_num_batched_tokens or max(8192 if cuda else 2048, model.n_positions)
        async_scheduling = self.tensor_parallel_size == 1 if self.async_scheduling is None else self.async_scheduling
        decode_burst = self.decode_burst or (DEFAULT_DECODE_BURST if cuda and self.tensor_parallel_size == 1 else 1)
        return dataclasses.replace(self, device=device, dtype=dtype, attention=attention, cuda_graphs=cuda_graphs,
                                   fused_kernels=fused,
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                   max_kv_splits=max_kv_splits, async_scheduling=async_scheduling,
                                   decode_burst=decode_burst)


def check_tensor_parallel(size: int, model: GPTConfig, device: torch.device) -> None:
    """``size`` ranks must split the heads and the MLP width evenly; on CUDA each rank needs a GPU."""
    if size == 1:
        return
    if model.n_head % size or model.mlp_dim % size:
        divisors = [n for n in range(1, model.n_head + 1) if model.n_head % n == 0 and model.mlp_dim % n == 0]
        raise ConfigError(f"tensor_parallel_size={size} must divide the model's {model.n_head} heads and its MLP "
                          f"width {model.mlp_dim} (each rank holds whole heads); choose one of {divisors}")
    if device.type == "cuda":
        if size > torch.cuda.device_count():
            raise ConfigError(f"tensor_parallel_size={size} needs {size} CUDA GPUs (one a rank) but "
                              f"{torch.cuda.device_count()} are visible; lower it, or run on CPU (gloo)")
        if device.index not in (None, 0):
            raise ConfigError(f"with tensor_parallel_size={size} the ranks use cuda:0..cuda:{size - 1}; "
                              f"give device='cuda', not {str(device)!r} (use CUDA_VISIBLE_DEVICES to pick GPUs)")


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a torch device ({e}); use 'cpu' or 'cuda'") from None
    if device.type not in DEFAULT_DTYPE:
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
    if dtype not in set(DTYPES.values()):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16 (a torch.dtype or its name), got {dtype!r}")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bfloat16 support; use dtype='float16' or 'float32'")
    return dtype
