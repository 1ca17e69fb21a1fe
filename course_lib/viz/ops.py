"""Bars of every op of one layer: FLOPs and bytes side by side, on log axes.

:func:`draw_op_bars` draws the rows of :func:`course_lib.perf.layer_op_table` (one bar per op,
blue for matrix products, grey for element-wise ops) and keeps its artists in
``fig.course_handles``; :func:`update_op_bars` changes the bar lengths and the title for another
table of the same ops (another prompt length or layer) in the same figure.
Introduced in notebooks/07_prefill.ipynb.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.layout_engine import TightLayoutEngine

from ..errors import InputError

LEGEND = "   (blue: matrix products, grey: element-wise)"


def draw_op_bars(rows, title: str, flop_range=None, byte_range=None, fig=None):
    """Two panels of horizontal bars, FLOPs (left) and bytes (right), one bar per op of ``rows``.

    ``flop_range``/``byte_range`` fix the log axes, so that bars grow against a still axis when
    :func:`update_op_bars` shows a longer prompt. A reshape counts 0 FLOPs and is drawn as 1."""
    if not rows:
        raise InputError("draw_op_bars needs at least one op row; pass perf.layer_op_table(trace, layer, model)")
    if fig is None:
        fig = plt.figure(figsize=(10, 4))
    ax_f, ax_b = fig.subplots(1, 2)
    y = np.arange(len(rows))                      # positions, not names: "residual add" occurs twice
    colors = ["tab:blue" if r.kind == "matmul" else "tab:gray" for r in rows]
    flop_bars = ax_f.barh(y, [max(r.flops, 1) for r in rows], color=colors)
    ax_f.set_xscale("log"); ax_f.set_xlabel("FLOPs (log; merge heads is a reshape: 0)")
    ax_f.set_yticks(y); ax_f.set_yticklabels([r.op for r in rows]); ax_f.invert_yaxis()
    byte_bars = ax_b.barh(y, [r.bytes for r in rows], color=colors)
    ax_b.set_xscale("log"); ax_b.set_xlabel("bytes (log)")
    ax_b.set_yticks(y); ax_b.set_yticklabels([]); ax_b.invert_yaxis()
    if flop_range:
        ax_f.set_xlim(*flop_range)
    if byte_range:
        ax_b.set_xlim(*byte_range)
    suptitle = fig.suptitle(title + LEGEND, fontsize=10)
    TightLayoutEngine().execute(fig)   # fig.tight_layout() would leave an engine: two draws per savefig
    fig.course_handles = {"flops": flop_bars, "bytes": byte_bars, "ops": [r.op for r in rows],
                          "suptitle": suptitle}
    return fig


def update_op_bars(fig, rows, title: str):
    """Show another table of the same ops in a figure that :func:`draw_op_bars` drew."""
    h = fig.course_handles
    if [r.op for r in rows] != h["ops"]:
        raise InputError("these rows list other ops than the figure shows; draw a new one with draw_op_bars")
    for bar, r in zip(h["flops"], rows):
        bar.set_width(max(r.flops, 1))
    for bar, r in zip(h["bytes"], rows):
        bar.set_width(r.bytes)
    h["suptitle"].set_text(title + LEGEND)
    return fig
