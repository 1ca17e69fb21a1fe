"""Sliders over tiled attention: the logic behind notebook 12's widgets.

:func:`online_softmax_view` picks the state after one tile out of an
:class:`~course_lib.tiled.OnlineSoftmaxRun` as plain numbers, with the exact softmax over the same
keys beside it; :func:`tile_grid_counts` runs the tiled causal loop for a length and a tile size.
The builders wire sliders to those functions and to the figures of :mod:`course_lib.viz.tiles`,
which are drawn once and then only moved. Tests call the plain functions and the callbacks
without a browser. Introduced in notebooks/12_flash_attention.ipynb.
"""

from __future__ import annotations

import io

import numpy as np

from ..errors import InputError
from ..tiled import softmax, tiled_causal_attention


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return buf.getvalue()


def online_softmax_view(run, step: int, values) -> dict:
    """The state after tile ``step`` (0-based) and the exact attention over the same keys.

    ``values`` ``(S, Dh)``: the run's values, to compute ``softmax(scores[:end]) @ values[:end]``.
    """
    if not isinstance(step, (int, np.integer)) or not 0 <= step < run.n_tiles:
        raise InputError(f"step must be a tile index in 0..{run.n_tiles - 1}, got {step!r}")
    st = run.states[step]
    end = run.bounds[step][1]
    exact = softmax(run.scores[:end]) @ np.asarray(values, dtype=np.float64)[:end]
    return {"step": step, "keys_seen": end, "m": st.m, "l": st.l, "alpha": run.alphas[step],
            "output": st.output, "exact_over_seen": exact,
            "true_max_over_seen": float(run.scores[:end].max()),
            "max_grew": bool(step > 0 and run.alphas[step] < 1.0)}


def online_softmax_summary(view: dict) -> str:
    if view["step"] == 0:
        grew = "the first tile: nothing to rescale yet"
    elif view["max_grew"]:
        grew = f"the maximum grew: old sum and output × {view['alpha']:.3f}"
    else:
        grew = "the maximum did not grow: nothing rescaled"
    err = float(np.abs(view["output"] - view["exact_over_seen"]).max())
    return (f"after tile {view['step'] + 1}: {view['keys_seen']} keys folded in, m = {view['m']:.3f}, "
            f"l = {view['l']:.3f}; {grew}; acc/l differs from softmax over those keys by {err:.1e}")


def build_online_softmax_widget(run, values):
    """A slider over the tiles of ``run``; the figure is built once and its artists moved."""
    import ipywidgets as W
    import matplotlib.pyplot as plt

    from ..viz.tiles import OnlineSoftmaxFigure

    drawing = OnlineSoftmaxFigure(run, step=0)
    plt.close(drawing.fig)                      # shown through the Image below, not inline
    step = W.IntSlider(value=0, min=0, max=run.n_tiles - 1, description="tile")
    info = W.HTML()
    image = W.Image(format="png", layout=W.Layout(max_width="100%"))

    def redraw(*_):
        view = online_softmax_view(run, step.value, values)
        drawing.show_step(step.value)
        info.value = online_softmax_summary(view)
        image.value = _png(drawing.fig)

    step.observe(redraw, names="value")
    redraw()
    box = W.VBox([step, info, image])
    box.drawing = drawing
    return box


def tile_grid_counts(T: int, tile: int, head_dim: int = 8, seed: int = 0):
    """Run :func:`~course_lib.tiled.tiled_causal_attention` on random ``(T, head_dim)`` inputs and
    return its :class:`~course_lib.tiled.TileCounts` (the output is checked against nothing here)."""
    for name, value in (("T", T), ("tile", tile), ("head_dim", head_dim)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(3, T, head_dim))
    return tiled_causal_attention(q, k, v, tile)[1]


def build_tile_grid_widget(T: int = 256, tile: int = 32):
    """Sliders for the length and the tile size; the grid's artists are moved, not redrawn."""
    import ipywidgets as W
    import matplotlib.pyplot as plt

    from ..viz.tiles import TileGridFigure

    length = W.IntSlider(value=T, min=16, max=1024, step=16, description="T")
    size = W.Dropdown(options=[8, 16, 32, 64, 128], value=tile, description="tile")
    image = W.Image(format="png", layout=W.Layout(max_width="60%"))
    drawing = TileGridFigure(tile_grid_counts(T, tile), tile, tile, T)
    plt.close(drawing.fig)
    state = {}

    def redraw(*_):
        counts = tile_grid_counts(length.value, size.value)
        drawing.show(counts, size.value, size.value, length.value)
        state["counts"] = counts
        image.value = _png(drawing.fig)

    length.observe(redraw, names="value")
    size.observe(redraw, names="value")
    redraw()
    box = W.VBox([W.HBox([length, size]), image])
    box.state, box.drawing = state, drawing
    return box
