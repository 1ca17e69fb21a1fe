"""Notebook 13's widget: how the pipeline bubble shrinks with more micro-batches.

:func:`pipeline_view` simulates the schedule of ``p`` equal stages and ``m`` micro-batches
(:func:`course_lib.parallel.ideal_schedule`) and measures its idle share with the same
:func:`course_lib.parallel.bubble_fraction` that measures the real runs; :class:`PipelineExplorer`
puts two sliders on it and draws the schedule with :func:`course_lib.viz.parallel.schedule_figure`.
Introduced in notebooks/13_many_devices.ipynb.
"""

from __future__ import annotations

import ipywidgets as W

from ..errors import InputError
from ..parallel import bubble_fraction, ideal_bubble, ideal_schedule
from ..viz.parallel import schedule_figure
from .common import Explorer, figure_png


def pipeline_view(n_stages: int, n_micro: int) -> dict:
    """The simulated schedule of ``n_stages`` × ``n_micro`` and its bubble, measured and by formula."""
    for name, v, hi in (("n_stages", n_stages, 16), ("n_micro", n_micro, 64)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise InputError(f"{name} must be an integer in 1..{hi}, got {v!r}")
    rows = ideal_schedule(n_stages, n_micro)
    return {"n_stages": n_stages, "n_micro": n_micro, "intervals": rows,
            "bubble": bubble_fraction(rows, n_stages), "formula": ideal_bubble(n_stages, n_micro),
            "makespan": max(r[3] for r in rows), "busy_per_stage": n_micro}


def pipeline_summary(view: dict) -> str:
    p, m = view["n_stages"], view["n_micro"]
    return (f"p = {p} stages, m = {m} micro-batches: the schedule takes {view['makespan']:.0f} steps "
            f"for {m} steps of work per stage; idle share {view['bubble']:.3f} "
            f"(formula (p−1)/(m+p−1) = {view['formula']:.3f})")


def pipeline_figure(view: dict):
    p, m = view["n_stages"], view["n_micro"]
    return schedule_figure(view["intervals"], p, unit="steps",
                           title=f"{p} stages, {m} micro-batches: bubble {view['bubble']:.0%}")


class PipelineExplorer(Explorer):
    """Sliders for the number of stages and of micro-batches; the schedule and its bubble."""

    def __init__(self, n_stages: int = 2, n_micro: int = 4):
        self.stages = W.IntSlider(value=n_stages, min=1, max=8, description="stages p")
        self.micro = W.IntSlider(value=n_micro, min=1, max=32, description="micro-batches m")
        super().__init__([W.HBox([self.stages, self.micro])], watch=[self.stages, self.micro])
        self.update()

    def compute(self):
        self.view = pipeline_view(self.stages.value, self.micro.value)
        return pipeline_summary(self.view), figure_png(pipeline_figure(self.view))
