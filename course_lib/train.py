"""Training the tiny GPT on the CPU: AdamW, warm-up then cosine decay, a tqdm progress bar.

Introduced in notebooks/06_tiny_gpt.ipynb, which trains a small model live and plots the loss
as it falls. ``scripts/make_assets.py`` uses the same loop for the shipped model.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .data import eval_windows, random_batch
from .errors import InputError
from .model import GPT


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 32
    block_size: int | None = None  # None: the model's n_positions
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1 or not 0 <= self.min_lr <= self.lr:
            raise InputError(f"need 0 < lr < 1 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")


@dataclass
class TrainRecord:
    """What a run leaves behind: the loss curves, timings and settings (written as JSON)."""

    settings: dict
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens_seen: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def learning_rate(step: int, s: TrainSettings) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at the last step."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: GPT, stream: torch.Tensor, block_size: int | None = None, batch_size: int = 64) -> float:
    """Mean next-token loss over every non-overlapping window of ``stream`` (deterministic)."""
    block_size = block_size or model.config.n_positions
    x, y = eval_windows(stream, block_size)
    if len(x) == 0:
        raise InputError(f"evaluation stream of {len(stream)} tokens is shorter than one window of {block_size}")
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        total += model.loss(xb, yb).item() * len(xb)
    model.train(was_training)
    return total / len(x)


def train(model: GPT, train_stream: torch.Tensor, val_stream: torch.Tensor, settings: TrainSettings,
          callback: Callable[[int, float, float | None], None] | None = None,
          progress: bool = True) -> TrainRecord:
    """Train ``model`` in place. ``callback(step, train_loss, val_loss_or_None)`` runs every step,
    e.g. to redraw a live loss curve."""
    from tqdm.auto import tqdm

    block = settings.block_size or model.config.n_positions
    if block > model.config.n_positions:
        raise InputError(f"block_size {block} exceeds the model's n_positions {model.config.n_positions}")
    gen = torch.Generator().manual_seed(settings.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
    record = TrainRecord(settings=asdict(settings))
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(settings.steps), desc="training", disable=not progress, mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, settings)
        x, y = random_batch(train_stream, settings.batch_size, block, gen)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        record.steps.append(step)
        record.train_loss.append(loss.item())
        record.tokens_seen += x.numel()
        val = None
        if (step + 1) % settings.eval_every == 0 or step == settings.steps - 1:
            val = evaluate(model, val_stream, block)
            record.val_steps.append(step)
            record.val_loss.append(val)
            bar.set_postfix(train=f"{loss.item():.3f}", val=f"{val:.3f}")
        if callback is not None:
            callback(step, loss.item(), val)
    record.seconds = time.perf_counter() - start
    model.eval()
    return record
