"""The model runner: one flat batch per step through the GPT's weights.

The runner takes a :class:`~course_lib.engine.batch.FlatBatch` and runs the weights of a
:class:`course_lib.model.GPT` (the reference model's own parameters; nothing is redefined):
embeddings → per layer LayerNorm, QKV, *write K/V into the pool*, attention, output projection,
MLP → final LayerNorm and the LM head on the logit rows only. Prefill rows and decode rows go
through the same lines.

Two ways to run a step, one forward: eagerly (CPU, or CUDA with ``cuda_graphs=False``), or by
replaying the CUDA graph captured for the step's token-count bucket (step_graphs.py), which
turns a step's hundreds of kernel launches into one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..model import GPT, gelu
from .batch import FlatBatch
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


def to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """The step's int64 arrays as tensors on ``device``: free on the CPU (views of the numpy
    arrays), one host→device copy on a GPU."""
    if device.type == "cpu":
        return {name: torch.from_numpy(a) for name, a in arrays.items()}
    flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays.values()])).to(device, non_blocking=True)
    parts = flat.split([a.size for a in arrays.values()])
    return {name: p.view(a.shape) for (name, a), p in zip(arrays.items(), parts)}


class ModelRunner:
    def __init__(self, model: GPT, kv_cache: PagedKVCache, attention):
        self.model = model
        self.config = model.config
        self.kv = kv_cache
        self.attention = attention
        self.device = model.transformer.wte.weight.device
        # GELU in one fused kernel: the same tanh formula as the reference's five element-wise ops,
        # rounded differently only in the last bit, and twice as fast
        self.fused_gelu = model.config.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        self.step_graphs = None        # StepGraphs once captured (step_graphs.py)

    def execute(self, flat: FlatBatch) -> torch.Tensor:
        """Logits ``(R, V)`` of the batch's logit rows; every new token's K/V written to the pool."""
        if self.step_graphs is not None:
            logits = self.step_graphs.run(flat)
            if logits is not None:
                return logits
        arrays = {**flat.arrays(), **self.attention.extra_arrays(flat)}
        views = to_device(arrays, self.device)
        meta = self.attention.metadata(flat, views, self.kv.pool.dtype, self.kv.block_size)
        batch = DeviceBatch(views["input_ids"], views["positions"], views["slot_mapping"],
                            views["logits_indices"], meta)
        return self.forward(batch)

    def mlp(self, block, h: torch.Tensor) -> torch.Tensor:
        if self.fused_gelu:
            return block.mlp.c_proj(F.gelu(block.mlp.c_fc(h), approximate="tanh"))
        return block.mlp.c_proj(gelu(block.mlp.c_fc(h), block.mlp.activation))

    @torch.inference_mode()
    def forward(self, b: DeviceBatch, logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(R, V)`` for the rows in ``b.logits_indices``; writes every new token's K/V.
        ``logits_out`` (R, V): write them there (the step graphs share one logits buffer)."""
        tr = self.model.transformer
        N = b.input_ids.shape[0]
        D, H = self.config.n_embd, self.config.n_head
        x = tr.wte(b.input_ids) + tr.wpe(b.positions)                 # (N, D)
        for layer, block in enumerate(tr.h):
            h = block.ln_1(x)
            q, k, v = block.attn.c_attn(h).split(D, dim=-1)            # 3 x (N, D)
            q, k, v = (t.view(N, H, D // H) for t in (q, k, v))        # (N, H, Dh)
            self.kv.write(layer, k, v, b.slot_mapping)
            o = self.attention.forward(q, k, v, self.kv, layer, b.attention)   # (N, H, Dh)
            x = x + block.attn.c_proj(o.reshape(N, D))
            x = x + self.mlp(block, block.ln_2(x))
        x = tr.ln_f(x[b.logits_indices])                               # (R, D): only rows that sample
        if logits_out is not None:
            return torch.mm(x, self.model.lm_head.weight.t(), out=logits_out)   # (R, V)
        return self.model.lm_head(x)                                   # (R, V)
