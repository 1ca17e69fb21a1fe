"""A live loss curve: pass :class:`LiveLossCurve` as the ``callback`` of ``course_lib.train.train``
and the curve redraws while the model trains.

Introduced in notebooks/06_tiny_gpt.ipynb.
"""

from __future__ import annotations

import time

import ipywidgets as widgets

from ..viz.training import record_figure
from .common import figure_png


class LiveLossCurve(widgets.VBox):
    """Collects ``(step, train_loss, val_loss)`` from the training callback and redraws the
    curve at most every ``every`` steps and ``min_seconds`` seconds (drawing costs time too)."""

    def __init__(self, total_steps: int | None = None, every: int = 10, min_seconds: float = 1.0,
                 vocab_size: int | None = None):
        self.steps, self.train_loss, self.val_steps, self.val_loss = [], [], [], []
        self.total_steps, self.every, self.min_seconds = total_steps, every, min_seconds
        self.vocab_size = vocab_size
        self.redraws = 0
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
        n = len(self.steps)
        title = title or (f"step {self.steps[-1] + 1}" + (f" of {self.total_steps}" if self.total_steps else "")
                          if n else "no steps yet")
        return record_figure(self.as_record(), title=title, vocab_size=self.vocab_size)

    def redraw(self) -> None:
        self.image.value = figure_png(self.figure())
        self.redraws += 1
        self._last_draw = time.perf_counter()
        if self.steps:
            text = f"step {self.steps[-1] + 1}: train loss {self.train_loss[-1]:.3f}"
            if self.val_loss:
                text += f", validation loss {self.val_loss[-1]:.3f} (at step {self.val_steps[-1] + 1})"
            self.label.value = text
