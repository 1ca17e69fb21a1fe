"""The op table of one prefill layer as the prompt grows: the logic behind notebook 07's widget.

:func:`op_rows` runs prefill on the first ``n_tokens`` of a prompt and returns
:func:`course_lib.perf.layer_op_table` of one layer; :func:`op_ranges` the log-axis limits that
hold every length; :func:`attention_share` the summary line; :func:`build_op_widget` wires two
sliders to :func:`course_lib.viz.ops.draw_op_bars`, drawn once and then updated. Tests call
them without a browser. Introduced in notebooks/07_prefill.ipynb.
"""

from __future__ import annotations

import torch

from .. import perf
from ..errors import InputError
from ..model import Trace

ATTENTION_MATMULS = ("scores q @ kᵀ", "weights @ v")


@torch.no_grad()
def op_rows(model, ids, n_tokens: int, layer: int = 0) -> list:
    """Op rows of block ``layer`` after a forward pass over ``ids[:n_tokens]``."""
    if not isinstance(n_tokens, int) or not 1 <= n_tokens <= len(ids):
        raise InputError(f"n_tokens must be in 1..{len(ids)} (the prompt's length), got {n_tokens!r}")
    if not isinstance(layer, int) or not 0 <= layer < model.config.n_layer:
        raise InputError(f"layer must be in 0..{model.config.n_layer - 1}, got {layer!r}")
    device = next(model.parameters()).device
    trace = Trace()
    model(torch.tensor([list(ids[:n_tokens])], device=device), trace=trace)   # (1, n_tokens)
    return perf.layer_op_table(trace, layer, model)


def op_ranges(model, ids, min_tokens: int = 2, layer: int = 0):
    """Log-axis limits (FLOPs, bytes) that hold every prompt length from ``min_tokens`` to
    ``len(ids)``: the counts grow with the length, so the two ends bound them."""
    tables = [op_rows(model, ids, n, layer) for n in (min_tokens, len(ids))]
    flops = [max(r.flops, 1) for t in tables for r in t]
    nbytes = [r.bytes for t in tables for r in t]
    return (min(flops) / 2, max(flops) * 2), (min(nbytes) / 2, max(nbytes) * 2)


def attention_share(rows) -> float:
    """FLOPs of attention's two products (full T×T, as executed) over the other matrix products."""
    att = sum(r.flops for r in rows if r.op in ATTENTION_MATMULS)
    rest = sum(r.flops for r in rows if r.kind == "matmul" and r.op not in ATTENTION_MATMULS)
    return att / rest


def op_title(n_tokens: int, layer: int) -> str:
    return f"layer {layer}, prefill of T = {n_tokens} tokens"


def build_op_widget(model, ids, min_tokens: int = 2):
    """Sliders for the prompt length T and the layer; the op bars are drawn once and updated.

    Returns a VBox of ``[HBox(T, layer), info, image]``; the figure is ``box.fig`` and the
    callback ``box.redraw()`` (what a slider move runs)."""
    import ipywidgets as W

    from ..viz.ops import draw_op_bars, update_op_bars
    from .common import canvas_png, detach_figure, tight_bbox

    if len(ids) < min_tokens:
        raise InputError(f"the prompt has {len(ids)} tokens; the widget needs at least {min_tokens}")
    wide = W.Layout(width="320px", min_width="300px")
    n_tokens = W.IntSlider(value=len(ids), min=min_tokens, max=len(ids), description="T", layout=wide)
    layer = W.IntSlider(value=0, min=0, max=model.config.n_layer - 1, description="layer", layout=wide)
    info = W.HTML()
    image = W.Image(format="png", layout=W.Layout(max_width="100%"))
    flop_range, byte_range = op_ranges(model, ids, min_tokens)   # every layer has the same shapes
    rows = op_rows(model, ids, len(ids), 0)
    fig = detach_figure(draw_op_bars(rows, op_title(len(ids), 0), flop_range, byte_range))
    bbox = tight_bbox(fig)
    box = W.VBox([W.HBox([n_tokens, layer], layout=W.Layout(flex_flow="row wrap")), info, image])

    def redraw(*_):
        rows = op_rows(model, ids, n_tokens.value, layer.value)
        info.value = (f"attention matmuls (full T×T, as executed) / projections = "
                      f"{attention_share(rows):.3f}")
        update_op_bars(fig, rows, op_title(n_tokens.value, layer.value))
        image.value = canvas_png(fig, 80, bbox)

    for w in (n_tokens, layer):
        w.observe(redraw, names="value")
    redraw()
    box.fig, box.redraw = fig, redraw
    return box
