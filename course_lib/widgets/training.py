"""A live loss curve: pass :class:`LiveLossCurve` as the ``callback`` of ``course_lib.train.train``
and the curve redraws while the model trains.

Introduced in notebooks/06_tiny_gpt.ipynb.
"""

from __future__ import annotations

import math
import time

import ipywidgets as widgets
import matplotlib.pyplot as plt

from ..viz.training import record_figure, smooth
from .common import canvas_png, detach_figure


class LiveLossCurve(widgets.VBox):
    """Collects ``(step, train_loss, val_loss)`` from the training callback and redraws the
    curve at most every ``every`` steps and ``min_seconds`` seconds (drawing costs time too).
    The figure is built once; each redraw gives its lines the new data."""

    def __init__(self, total_steps: int | None = None, every: int = 10, min_seconds: float = 1.0,
                 vocab_size: int | None = None):
        self.steps, self.train_loss, self.val_steps, self.val_loss = [], [], [], []
        self.total_steps, self.every, self.min_seconds = total_steps, every, min_seconds
        self.vocab_size = vocab_size
        self.redraws = 0
        self.fig = None                      # built at the first redraw, then only updated
        self._last_draw = 0.0
        self.label = widgets.HTML("waiting for the first step…")
        self.image = widgets.Image(format="png")
        super().__init__(children=[self.label, self.image])

    def __call__(self, step: int, train_loss: float, val_loss: float | None = None) -> None:
        self.steps.append(step)
        self.train_loss.append(float(train_loss))
        if val_loss is not None:
            self.val_steps.append(step)
            self.val_loss.append(float(val_loss))
        last = self.total_steps is not None and step >= self.total_steps - 1
        due = len(self.steps) % self.every == 0 and time.perf_counter() - self._last_draw >= self.min_seconds
        if due or last or val_loss is not None:
            self.redraw()

    def as_record(self) -> dict:
        return {"steps": self.steps, "train_loss": self.train_loss,
                "val_steps": self.val_steps, "val_loss": self.val_loss}

    def figure(self, title: str | None = None):
        """A new, separate figure of the curve so far (the live one is :attr:`fig`)."""
        return record_figure(self.as_record(), title=title or self._title(), vocab_size=self.vocab_size)

    def _title(self) -> str:
        if not self.steps:
            return "no steps yet"
        return f"step {self.steps[-1] + 1}" + (f" of {self.total_steps}" if self.total_steps else "")

    def _draw(self) -> None:
        """Build the live figure once: its lines get new data at every redraw."""
        fig, ax = plt.subplots(figsize=(7, 3.6))
        self.fig = detach_figure(fig)
        (self._raw,) = ax.plot([], [], color="#1f77b4", alpha=0.25, linewidth=0.8)
        (self._smooth,) = ax.plot([], [], color="#1f77b4", label="train (smoothed)")
        (self._val,) = ax.plot([], [], "o-", color="#d62728", label="validation")
        if self.vocab_size:
            ax.axhline(math.log(self.vocab_size), color="gray", linestyle=":",
                       label=f"uniform guess ln {self.vocab_size}")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
        self._title_text = ax.set_title("", fontsize=10)
        fig.tight_layout()

    def redraw(self) -> None:
        """Put the losses so far into the live figure's lines and show it."""
        if self.fig is None:
            self._draw()
        self._raw.set_data(self.steps, self.train_loss)
        self._smooth.set_data(self.steps, smooth(self.train_loss))
        self._val.set_data(self.val_steps, self.val_loss)
        self._title_text.set_text(self._title())
        ax = self.fig.axes[0]
        ax.relim()
        ax.autoscale_view()
        if self.total_steps:                  # the whole run's width from the start: the curve grows into it
            ax.set_xlim(0, self.total_steps)
        self.image.value = canvas_png(self.fig, 80)
        self.redraws += 1
        self._last_draw = time.perf_counter()
        if self.steps:
            text = f"step {self.steps[-1] + 1}: train loss {self.train_loss[-1]:.3f}"
            if self.val_loss:
                text += f", validation loss {self.val_loss[-1]:.3f} (at step {self.val_steps[-1] + 1})"
            self.label.value = text
