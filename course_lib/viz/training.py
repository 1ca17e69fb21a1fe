"""Loss curves: a finished run (a ``TrainRecord`` or the shipped ``training_record.json``) or a run
in progress (lists that grow step by step).

Introduced in notebooks/06_tiny_gpt.ipynb.
"""

from __future__ import annotations

import math

import numpy as np
import matplotlib.pyplot as plt

from ..errors import InputError


def smooth(values, window: int = 20) -> np.ndarray:
    """Trailing moving average (the first points average over what exists so far)."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or v.size == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def loss_curve(ax, steps, train_loss, val_steps=(), val_loss=(), title: str | None = None,
               window: int = 20, vocab_size: int | None = None) -> None:
    """Train loss (raw, faint; smoothed, solid) and validation loss (dots) on ``ax``.

    With ``vocab_size`` a dotted line marks ln(V): the loss of a model that guesses uniformly.
    """
    if len(steps) != len(train_loss):
        raise InputError(f"{len(steps)} steps but {len(train_loss)} train losses")
    if len(val_steps) != len(val_loss):
        raise InputError(f"{len(val_steps)} validation steps but {len(val_loss)} validation losses")
    if len(steps):
        ax.plot(steps, train_loss, color="#1f77b4", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(train_loss, window), color="#1f77b4", label="train (smoothed)")
    if len(val_steps):
        ax.plot(val_steps, val_loss, "o-", color="#d62728", label="validation")
    if vocab_size:
        ax.axhline(math.log(vocab_size), color="gray", linestyle=":", label=f"uniform guess ln {vocab_size}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def record_figure(record: dict, title: str | None = None, vocab_size: int | None = None):
    """The loss curves of a finished run, from its record dict."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    loss_curve(ax, record["steps"], record["train_loss"], record.get("val_steps", ()),
               record.get("val_loss", ()), title=title, vocab_size=vocab_size)
    fig.tight_layout()
    return fig
