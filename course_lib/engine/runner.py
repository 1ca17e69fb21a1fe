"""The model runner: one flat batch per step through the GPT's weights.

The runner takes a :class:`~course_lib.engine.batch.FlatBatch` and runs the weights of a
:class:`course_lib.model.GPT` (the reference model's own parameters; nothing is redefined):
embeddings → per layer LayerNorm, QKV, *write K/V into the pool*, attention, output projection,
MLP → final LayerNorm and the LM head on the logit rows only. Prefill rows and decode rows go
through the same lines.

With tensor parallelism (tensor_parallel.py) every rank runs this same forward on its shard of
the weights — its heads, its MLP columns — and :meth:`ModelRunner.all_reduce` sums the partial
outputs of the two row-split products (attention's output projection, the MLP's second matmul);
with one rank it returns its input.

On CUDA with attention="triton" the same forward runs through fused kernels by default
(``EngineConfig.fused_kernels``; fused_forward.py lists which kernel does what): add + LayerNorm
in one kernel, GEMVs of our own for the few rows of a decode step. The lines below stay the
reference, and are what runs on the CPU.

Two ways to run a step, one forward: eagerly (CPU, or CUDA with ``cuda_graphs=False``), or by
replaying the CUDA graph captured for the step's token-count bucket (step_graphs.py), which
turns a step's hundreds of kernel launches into one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..model import GPT, gelu
from .attention import make_attention
from .batch import FlatBatch
from .config import EngineConfig
from .kv_cache import PagedKVCache


@dataclass
class DeviceBatch:
    """What the forward reads: the flat batch's tensors (N tokens, R logit rows) and the attention
    implementation's own metadata."""

    input_ids: torch.Tensor        # (N,)
    positions: torch.Tensor        # (N,)
    slot_mapping: torch.Tensor     # (N,)
    logits_indices: torch.Tensor   # (R,)
    attention: object              # TorchMetadata or TritonMetadata (attention.py)
    feed_rows: torch.Tensor | None = None   # (N,) 0: id from input_ids; r + 1: the last step's sampled row r


def to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """The step's int64 arrays as tensors on ``device``: free on the CPU (views of the numpy
    arrays), one host→device copy on a GPU."""
    if device.type == "cpu":
        return {name: torch.from_numpy(a) for name, a in arrays.items()}
    flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays.values()])).to(device, non_blocking=True)
    parts = flat.split([a.size for a in arrays.values()])
    return {name: p.view(a.shape) for (name, a), p in zip(arrays.items(), parts)}


class ModelRunner:
    def __init__(self, model: GPT, kv_cache: PagedKVCache, attention, tp=None, fused_kernels: bool = False):
        """``model``: the GPT, or this rank's shard of it; ``tp``: the rank's
        :class:`~course_lib.engine.tensor_parallel.Collectives` (None: one rank); ``fused_kernels``:
        run :class:`~course_lib.engine.fused_forward.FusedForward` (Triton) instead of the lines below."""
        self.model = model
        self.config = model.config
        self.kv = kv_cache
        self.attention = attention
        self.device = model.transformer.wte.weight.device
        # GELU in one fused kernel: the same tanh formula as the reference's five element-wise ops,
        # rounded differently only in the last bit, and twice as fast
        self.fused_gelu = model.config.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        self.step_graphs = None        # StepGraphs once captured (step_graphs.py)
        self.tp = tp
        self.fused = None
        if fused_kernels:
            from .fused_forward import FusedForward

            self.fused = FusedForward(self)
        # the tokens the last step sampled, (S,) on the device: a decode row of the next step whose
        # token the host has not read yet takes its id from here (batch.py's feed_rows), also inside
        # a captured step graph (a fixed address). Sized by build_runner (max_num_seqs rows).
        self.sampled_tokens = torch.zeros(1, dtype=torch.long, device=self.device)

    @property
    def logits_width(self) -> int:
        """Columns of a ``logits_out`` buffer: the vocabulary, padded for the fused forward's head."""
        return self.fused.head.shape[0] if self.fused is not None else self.config.vocab_size

    def keep_sampled(self, tokens: torch.Tensor) -> None:
        """Keep the step's sampled tokens ``(R,)`` on the device for the next step's decode rows
        (nothing to do when they are already there: a step graph's greedy tokens, sampler.py)."""
        if tokens.data_ptr() != self.sampled_tokens.data_ptr():
            self.sampled_tokens[:tokens.shape[0]].copy_(tokens)

    def execute(self, flat: FlatBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(R, V)`` of the batch's logit rows, and their greedy tokens ``(R,)`` when a step
        graph computed them (``None`` otherwise); every new token's K/V written to the pool."""
        if self.step_graphs is not None:
            replayed = self.step_graphs.run(flat)
            if replayed is not None:
                return replayed
        arrays = {**flat.arrays(), **self.attention.extra_arrays(flat)}
        views = to_device(arrays, self.device)
        meta = self.attention.metadata(flat, views, self.kv.pool.dtype, self.kv.block_size)
        batch = DeviceBatch(views["input_ids"], views["positions"], views["slot_mapping"],
                            views["logits_indices"], meta, views["feed_rows"])
        return self.forward(batch), None

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a row-split product's partial output (N, D); itself with one rank."""
        return partial if self.tp is None else self.tp.all_reduce(partial)

    def mlp(self, block, h: torch.Tensor) -> torch.Tensor:
        if self.fused_gelu:
            return block.mlp.c_proj(F.gelu(block.mlp.c_fc(h), approximate="tanh"))
        return block.mlp.c_proj(gelu(block.mlp.c_fc(h), block.mlp.activation))

    def token_ids(self, b: DeviceBatch) -> torch.Tensor:
        """The step's token ids ``(N,)``: the host's, except rows whose token is still on the device
        (``feed_rows`` > 0), which take the previous step's sampled token by a gather."""
        if b.feed_rows is None:
            return b.input_ids
        fed = self.sampled_tokens[(b.feed_rows - 1).clamp(min=0)]     # (N,)
        return torch.where(b.feed_rows > 0, fed, b.input_ids)

    @torch.inference_mode()
    def forward(self, b: DeviceBatch, logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(R, V)`` for the rows in ``b.logits_indices``; writes every new token's K/V.
        ``logits_out`` (R, :attr:`logits_width`): write them there (the step graphs share one
        logits buffer); the columns past V are the fused head's padding, never read."""
        if self.fused is not None:
            return self.fused.forward(b, logits_out)
        tr = self.model.transformer
        N = b.input_ids.shape[0]
        H, Dh = self.kv.num_heads, self.config.head_dim               # this rank's heads (all, with one rank)
        x = tr.wte(self.token_ids(b)) + tr.wpe(b.positions)            # (N, D)
        for layer, block in enumerate(tr.h):
            h = block.ln_1(x)
            q, k, v = block.attn.c_attn(h).split(H * Dh, dim=-1)       # 3 x (N, H * Dh)
            q, k, v = (t.view(N, H, Dh) for t in (q, k, v))            # (N, H, Dh)
            self.kv.write(layer, k, v, b.slot_mapping)
            o = self.attention.forward(q, k, v, self.kv, layer, b.attention)   # (N, H, Dh)
            x = x + self.all_reduce(block.attn.c_proj(o.reshape(N, H * Dh)))   # (N, D) summed over ranks
            x = x + self.all_reduce(self.mlp(block, block.ln_2(x)))
        x = tr.ln_f(x[b.logits_indices])                               # (R, D): only rows that sample
        if logits_out is not None:                                     # (R, logits_width): the first V columns
            return torch.mm(x, self.model.lm_head.weight.t(), out=logits_out[:, :self.config.vocab_size])   # (R, V)
        return self.model.lm_head(x)                                   # (R, V)


def build_runner(model: GPT, config: EngineConfig, num_kv_blocks: int, tp=None) -> ModelRunner:
    """One rank's KV pool, attention path and runner for a resolved config; its CUDA graphs captured
    when they are on. ``model``: the whole GPT, or with ``tp`` (tensor_parallel.Collectives) this
    rank's shard, whose pool then holds this rank's heads only. Every rank builds the same way, so
    the captures' warm-up steps meet in the same all-reduces."""
    cfg = model.config
    device = model.transformer.wte.weight.device                   # a worker's own GPU
    kv = PagedKVCache(cfg, num_kv_blocks, config.block_size, config.dtype, device,
                      triton_write=device.type == "cuda" and config.attention == "triton",
                      num_heads=cfg.n_head // config.tensor_parallel_size)
    head_bytes = cfg.head_dim * torch.finfo(config.dtype).bits // 8
    attention = make_attention(config.attention, config.max_kv_splits, cfg.n_positions, head_bytes)
    runner = ModelRunner(model, kv, attention, tp, fused_kernels=bool(config.fused_kernels))
    runner.sampled_tokens = torch.zeros(config.max_num_seqs, dtype=torch.long, device=device)   # (S,)
    if config.cuda_graphs:
        from .step_graphs import StepGraphs

        runner.step_graphs = StepGraphs(runner, config.max_num_batched_tokens, config.max_num_seqs,
                                        math.ceil(cfg.n_positions / config.block_size),
                                        staging_images=2 * config.decode_burst + 2)   # a burst ahead (Staging)
        runner.step_graphs.capture()
    return runner
