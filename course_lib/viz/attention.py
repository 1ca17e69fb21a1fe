"""Attention pictures: labelled heatmaps, the five steps side by side, per-head grids, one row as bars.

Every function takes plain tensors or arrays (one sequence, no batch axis) and token labels,
and returns a matplotlib ``Figure`` (or draws on the ``Axes`` it is given). Masked entries
(``-inf``) are drawn in light grey with a "−∞" label so the causal mask is visible.

Introduced in notebooks/02_q_k_v.ipynb (heatmaps) and notebooks/03_scores_mask_softmax.ipynb
(the steps); per-head grids in notebooks/04_multi_head_attention.ipynb.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.layout_engine import TightLayoutEngine
from matplotlib.patches import Rectangle

from ..errors import InputError

MASKED_COLOR = "#d9d9d9"
STEP_TITLES = {
    "scores": "scores\nQ·Kᵀ",
    "scaled": "scaled\n÷ √d_k",
    "mask": "mask\n(1 = may see)",
    "masked": "masked\n(−∞ above diagonal)",
    "weights": "weights\nsoftmax per row",
}


def as_array(x) -> np.ndarray:
    """A tensor, array or nested list as a float numpy array (on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


#: The widest figure a notebook shows at full size: about 1,000 px at 100 dpi.
MAX_WIDTH_IN = 10.0
#: At most this many token labels on an axis; longer prompts label every k-th token.
MAX_TICK_LABELS = 32


def figure_for(fig, size):
    """``fig`` cleared and resized to ``size`` (inches), or a new figure of that size when ``fig`` is
    None: a widget draws into the figure it already shows instead of making a new one."""
    if fig is None:
        return plt.figure(figsize=size)
    fig.clear()
    fig.set_size_inches(*size)
    return fig


def fit_figsize(width: float, height: float, max_width: float = MAX_WIDTH_IN) -> tuple[float, float]:
    """``(width, height)`` scaled down (aspect kept) so that the figure is at most ``max_width`` inches."""
    if width <= max_width:
        return width, height
    return max_width, height * max_width / width


def tick_step(n: int, max_labels: int = MAX_TICK_LABELS) -> int:
    """Label every ``tick_step``-th of ``n`` positions so that at most ``max_labels`` are written."""
    return max(1, -(-n // max_labels))


def _check_2d(matrix: np.ndarray, row_labels, col_labels) -> None:
    if matrix.ndim != 2:
        raise InputError(f"a heatmap needs a 2-D matrix, got shape {matrix.shape}")
    if row_labels is not None and len(row_labels) != matrix.shape[0]:
        raise InputError(f"{len(row_labels)} row labels for {matrix.shape[0]} rows")
    if col_labels is not None and len(col_labels) != matrix.shape[1]:
        raise InputError(f"{len(col_labels)} column labels for {matrix.shape[1]} columns")


def heatmap(ax, matrix, row_labels=None, col_labels=None, title: str | None = None,
            cmap: str = "viridis", annotate: bool | None = None, fmt: str = "{:.2f}",
            vmin: float | None = None, vmax: float | None = None, colorbar: bool = False,
            xlabel: str | None = None, ylabel: str | None = None):
    """Draw ``matrix`` (rows × cols) on ``ax`` with token labels; ``-inf`` cells are grey "−∞".

    ``annotate=None`` writes the numbers into the cells when the matrix is at most 10 × 10 and
    the widest number fits in a cell at 7 pt (otherwise colour alone carries the value: add a
    colour bar).
    Returns the image artist.
    """
    m = as_array(matrix)
    _check_2d(m, row_labels, col_labels)
    masked = ~np.isfinite(m)
    shown = np.ma.masked_array(m, mask=masked)
    cm = plt.get_cmap(cmap).with_extremes(bad=MASKED_COLOR)
    finite = m[~masked]
    if vmin is None:
        vmin = float(finite.min()) if finite.size else 0.0
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    if vmax <= vmin:
        vmax = vmin + 1e-9
    im = ax.imshow(shown, cmap=cm, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    rows, cols = m.shape
    set_token_ticks(ax, row_labels, col_labels)
    if annotate is None:
        annotate = rows <= 10 and cols <= 10 and _numbers_fit(ax, m, fmt, rows, cols)
    im.cell_texts, im.cell_fmt = [], fmt            # kept so that update_heatmap can rewrite them
    if annotate:
        for i in range(rows):
            for j in range(cols):
                im.cell_texts.append((i, j, ax.text(j, i, "", ha="center", va="center", fontsize=7)))
        _write_cells(im, m)
    if title:
        ax.set_title(title, fontsize=9)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    return im


def _numbers_fit(ax, m: np.ndarray, fmt: str, rows: int, cols: int, fontsize: float = 7) -> bool:
    """Whether ``fmt`` of the widest value of ``m`` fits inside one cell of ``ax`` (in points)."""
    w_in, h_in = ax.figure.get_size_inches()
    box = ax.get_position()
    cell_w, cell_h = box.width * w_in * 72 / cols, box.height * h_in * 72 / rows
    finite = m[np.isfinite(m)]
    widest = max((len(fmt.format(v)) for v in finite), default=2)
    return cell_w >= 0.62 * fontsize * widest + 2 and cell_h >= 1.4 * fontsize


def set_token_ticks(ax, row_labels=None, col_labels=None) -> None:
    """Token labels on a heatmap's axes; long prompts get every k-th label, never below 8 pt."""
    if row_labels is not None:
        k = tick_step(len(row_labels))
        ax.set_yticks(range(0, len(row_labels), k), [str(s) for s in row_labels][::k], fontsize=8)
    if col_labels is not None:
        k = tick_step(len(col_labels))
        ax.set_xticks(range(0, len(col_labels), k), [str(s) for s in col_labels][::k], fontsize=8, rotation=90)


def _write_cells(im, m: np.ndarray) -> None:
    """The numbers written into the cells of an annotated heatmap, coloured to stay readable."""
    cm = im.get_cmap()
    for i, j, text in im.cell_texts:
        if not np.isfinite(m[i, j]):
            text.set_text("−∞")
            text.set_color("#555555")
        else:
            r, g, b, _ = cm(im.norm(m[i, j]))
            text.set_text(im.cell_fmt.format(m[i, j]))
            text.set_color("white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.55 else "black")


def update_heatmap(im, matrix, vmin: float | None = None, vmax: float | None = None,
                   row_labels=None, col_labels=None):
    """Put new values into a heatmap that :func:`heatmap` drew, instead of drawing a new one.

    Changes the colours, the colour range (``None``: the finite minimum / maximum, as
    :func:`heatmap` does) and the numbers written in the cells. A new shape is allowed for a
    heatmap without numbers in its cells (pass the new ``row_labels`` / ``col_labels``).
    Returns the image artist.
    """
    m = as_array(matrix)
    if m.ndim != 2:
        raise InputError(f"a heatmap needs a 2-D matrix, got shape {m.shape}")
    masked = ~np.isfinite(m)
    if m.shape != im.get_array().shape:
        if im.cell_texts:
            raise InputError(f"this heatmap writes numbers into {im.get_array().shape} cells; draw a new one "
                             f"for shape {m.shape}")
        rows, cols = m.shape
        im.set_extent((-0.5, cols - 0.5, rows - 0.5, -0.5))
        im.axes.set_xlim(-0.5, cols - 0.5)
        im.axes.set_ylim(rows - 0.5, -0.5)
    if row_labels is not None or col_labels is not None:
        _check_2d(m, row_labels, col_labels)
        set_token_ticks(im.axes, row_labels, col_labels)
    im.set_data(np.ma.masked_array(m, mask=masked))
    finite = m[~masked]
    if vmin is None:
        vmin = float(finite.min()) if finite.size else 0.0
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    im.set_clim(vmin, vmax if vmax > vmin else vmin + 1e-9)
    _write_cells(im, m)
    return im


def highlight_row(ax, row: int, n_cols: int, color: str = "red") -> None:
    """Outline one row of a heatmap (the query being inspected)."""
    ax.add_patch(Rectangle((-0.5, row - 0.5), n_cols, 1, fill=False, edgecolor=color, linewidth=2))


def weights_bar(ax, row, labels, query_index: int | None = None, title: str | None = None,
                future_from: int | None = None) -> None:
    """One query's attention weights as bars, one bar per key. Keys at index ``>= future_from``
    (the future, when the mask is off) are drawn in red."""
    w = as_array(row).reshape(-1)
    if len(labels) != len(w):
        raise InputError(f"{len(labels)} labels for {len(w)} weights")
    bars = ax.bar(range(len(w)), w)
    k = tick_step(len(w))
    ax.set_xticks(range(0, len(w), k), [str(s) for s in labels][::k], rotation=90, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("weight", fontsize=8)
    texts = [ax.text(j, 0, "", ha="center", fontsize=7) for j in range(len(w))] if len(w) <= 12 else []
    handles = {"bars": bars, "texts": texts, "title": ax.set_title("", fontsize=9)}
    update_weights_bar(handles, w, labels, query_index, title, future_from)
    return handles


def update_weights_bar(handles: dict, row, labels, query_index: int | None = None, title: str | None = None,
                       future_from: int | None = None) -> None:
    """New heights, colours, numbers and title for the bars that :func:`weights_bar` drew."""
    w = as_array(row).reshape(-1)
    if len(w) != len(handles["bars"]):
        raise InputError(f"{len(w)} weights for {len(handles['bars'])} bars")
    for j, (bar, v) in enumerate(zip(handles["bars"], w)):
        bar.set_height(v)
        bar.set_color("#d62728" if future_from is not None and j >= future_from else "#1f77b4")
    for j, (text, v) in enumerate(zip(handles["texts"], w)):
        text.set_position((j, v + 0.02))
        text.set_text(f"{v:.2f}")
    if title is None and query_index is not None:
        title = f"weights of query {query_index} ({labels[query_index]!s}) — sum {w.sum():.3f}"
    handles["title"].set_text(title or "")


def _step_style(name: str, m: np.ndarray) -> dict:
    """Colour map and range of one step's heatmap."""
    if name == "mask":
        return dict(cmap="Greys", vmin=0, vmax=1.6, fmt="{:.0f}")
    if name == "weights":   # scaled to the largest weight so that flat rows still show
        return dict(cmap="Blues", vmin=0, vmax=max(0.05, float(m.max())))
    finite = m[np.isfinite(m)]
    lim = float(np.abs(finite).max()) if finite.size else 1.0
    return dict(cmap="coolwarm", vmin=-lim, vmax=lim)


def _future_from(steps: dict, query_index: int):
    mask = steps.get("mask")
    return query_index + 1 if mask is not None and as_array(mask)[query_index, query_index + 1:].any() else None


def steps_figure(steps: dict, labels, query_index: int | None = None, bar: bool = True,
                 suptitle: str | None = None, fig=None):
    """The five steps of one head side by side: scores, scaled, mask, masked, weights.

    ``steps`` maps those names to (T, S) matrices (``mask`` boolean or 0/1). With
    ``query_index`` the query's row is outlined and, if ``bar``, drawn as a bar chart below.
    With ``fig`` the steps are drawn into that (cleared) figure. The artists are kept in
    ``fig.course_handles`` for :func:`update_steps_figure`.
    """
    names = [n for n in STEP_TITLES if n in steps]
    if not names:
        raise InputError(f"steps has none of {list(STEP_TITLES)}; got {list(steps)}")
    n = len(names)
    T = as_array(steps[names[0]]).shape[0]
    width = min(3.6, max(2.6, 0.2 * T + 1.2))
    with_bar = bar and query_index is not None
    # tall enough that every written row label (8 pt) has its own line, with room for the rotated
    # column labels underneath; at most MAX_WIDTH_IN wide
    k = tick_step(T)
    label_in = 0.075 * max(len(str(s)) for s in list(labels)[::k])     # a rotated label's length
    top = max(1.8, 0.16 * -(-T // k)) + label_in + 0.6
    bottom = 1.6 + label_in
    size = (min(width * n, MAX_WIDTH_IN), top + bottom if with_bar else top)
    fig = figure_for(fig, size)
    if with_bar:
        gs = fig.add_gridspec(2, n, height_ratios=[top, bottom])
        axes = [fig.add_subplot(gs[0, i]) for i in range(n)]
        bar_ax = fig.add_subplot(gs[1, :])
    else:
        axes = list(np.atleast_1d(fig.subplots(1, n)))
        bar_ax = None
    handles = {"images": {}, "rows": [], "bar": None, "suptitle": None}
    for ax, name in zip(axes, names):
        m = as_array(steps[name])
        im = heatmap(ax, m, labels, labels, title=STEP_TITLES[name], **_step_style(name, m))
        handles["images"][name] = im
        if not im.cell_texts and name != "mask":         # too small for numbers: a colour bar says the value
            bar = fig.colorbar(im, cax=ax.inset_axes([1.04, 0.0, 0.07, 1.0]))
            bar.ax.tick_params(labelsize=8)
        if query_index is not None:
            highlight_row(ax, query_index, m.shape[1])
            handles["rows"].append(ax.patches[-1])
    for ax in axes[1:]:
        ax.set_yticklabels([])
    axes[0].set_ylabel("query (row)", fontsize=8)
    if bar_ax is not None:
        w = as_array(steps["weights"])[query_index]
        handles["bar"] = weights_bar(bar_ax, w, labels, query_index, future_from=_future_from(steps, query_index))
    if suptitle:
        handles["suptitle"] = fig.suptitle(suptitle, fontsize=10)
    # room for rotated token labels under every row of panels (once; no layout engine is left on the
    # figure, so a widget's redraws stay one pass)
    TightLayoutEngine(pad=0.4, h_pad=0.6, w_pad=0.4).execute(fig)
    fig.course_handles = handles
    return fig


def update_steps_figure(fig, steps: dict, labels, query_index: int | None = None, suptitle: str | None = None):
    """New values for a figure that :func:`steps_figure` drew (same tokens): the five heatmaps,
    the outlined row, the bars and the titles. Nothing is drawn afresh."""
    h = fig.course_handles
    for name, im in h["images"].items():
        m = as_array(steps[name])
        style = _step_style(name, m)
        update_heatmap(im, m, style["vmin"], style["vmax"])
    for rect in h["rows"]:
        rect.set_y(query_index - 0.5)
    if h["bar"] is not None:
        w = as_array(steps["weights"])[query_index]
        update_weights_bar(h["bar"], w, labels, query_index, future_from=_future_from(steps, query_index))
    if h["suptitle"] is not None and suptitle is not None:
        h["suptitle"].set_text(suptitle)
    return fig


def qkv_figure(q, k, v, labels, head_dim: int | None = None, title: str | None = None, fig=None):
    """Q, K and V (T, D) as three heatmaps with a row per token; dashed lines split the heads.

    With ``fig`` they are drawn into that (cleared) figure; the artists are kept in
    ``fig.course_handles`` for :func:`update_qkv_figure`."""
    size = (MAX_WIDTH_IN, min(8.0, max(2.5, 0.3 * min(len(labels), MAX_TICK_LABELS) + 1.2)))
    fig = figure_for(fig, size)
    axes = fig.subplots(1, 3)
    images = []
    for ax, name, m in zip(axes, "QKV", (q, k, v)):
        m = as_array(m)
        lim = float(np.abs(m).max()) or 1.0
        images.append(heatmap(ax, m, labels, None, title=f"{name}: {m.shape[0]} × {m.shape[1]}",
                              cmap="coolwarm", vmin=-lim, vmax=lim, annotate=False, xlabel="dimension"))
        if head_dim:
            for b in range(head_dim, m.shape[1], head_dim):
                ax.axvline(b - 0.5, color="black", linestyle="--", linewidth=0.8)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    sup = fig.suptitle(title, fontsize=10) if title else None
    fig.tight_layout()
    fig.course_handles = {"images": images, "suptitle": sup}
    return fig


def update_qkv_figure(fig, q, k, v, title: str | None = None):
    """New Q, K and V (same shapes) for a figure that :func:`qkv_figure` drew."""
    h = fig.course_handles
    for im, m in zip(h["images"], (q, k, v)):
        m = as_array(m)
        lim = float(np.abs(m).max()) or 1.0
        update_heatmap(im, m, -lim, lim)
    if title is not None and h["suptitle"] is not None:
        h["suptitle"].set_text(title)
    return fig


def head_grid(weights, labels, title: str | None = None, head_titles=None, highlight: int | None = None,
              annotate: bool | None = False):
    """Attention weights of several heads, ``(H, T, S)``, as a row of heatmaps."""
    w = as_array(weights)
    if w.ndim != 3:
        raise InputError(f"head_grid needs weights of shape (H, T, S), got {w.shape}")
    H, T, S = w.shape
    size = min(max(2.4, 0.24 * T + 1.0), (MAX_WIDTH_IN - 0.8) / H)
    fig, axes = plt.subplots(1, H, figsize=(size * H + 0.8, size + 0.7))
    axes = np.atleast_1d(axes)
    for h, ax in enumerate(axes):
        t = head_titles[h] if head_titles is not None else f"head {h}"
        im = heatmap(ax, w[h], labels, labels, title=t, cmap="Blues", vmin=0, vmax=1, annotate=annotate)
        if h:
            ax.set_yticklabels([])
        if highlight == h:
            for spine in ax.spines.values():
                spine.set_edgecolor("red")
                spine.set_linewidth(2.5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.colorbar(im, ax=list(axes), fraction=0.025, pad=0.02).set_label("attention weight", fontsize=8)
    return fig


def layer_head_grid(weights_per_layer, labels, row_titles=None, title: str | None = None):
    """Every head of every layer: ``(L, H, T, S)`` as an L × H grid of heatmaps."""
    w = as_array(weights_per_layer)
    if w.ndim != 4:
        raise InputError(f"layer_head_grid needs weights of shape (L, H, T, S), got {w.shape}")
    L, H, T, _ = w.shape
    size = min(max(2.0, 0.2 * T + 0.9), (MAX_WIDTH_IN - 0.8) / H)
    fig, axes = plt.subplots(L, H, figsize=(size * H + 0.8, size * L), squeeze=False)
    for layer in range(L):
        for h in range(H):
            ax = axes[layer, h]
            im = heatmap(ax, w[layer, h], labels if h == 0 else None, labels if layer == L - 1 else None,
                         cmap="Blues", vmin=0, vmax=1, annotate=False)
            if h > 0:
                ax.set_yticks([])
            if layer < L - 1:
                ax.set_xticks([])
            ax.set_title(row_titles[layer][h] if row_titles else f"layer {layer}, head {h}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.025, pad=0.02).set_label("attention weight", fontsize=8)
    return fig


def scaling_figure(dims, raw_std, scaled_std, raw_max_weight, scaled_max_weight):
    """Why 1/√d_k: the spread of q·k grows like √d_k and softmax saturates; scaling keeps both flat."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    a.plot(dims, raw_std, "o-", label="std of q·k")
    a.plot(dims, scaled_std, "s-", label="std of q·k / √d_k")
    a.plot(dims, np.sqrt(dims), ":", color="gray", label="√d_k")
    a.set_xscale("log", base=2)
    a.set_xlabel("d_k")
    a.set_title("spread of the scores", fontsize=9)
    a.legend(fontsize=8)
    b.plot(dims, raw_max_weight, "o-", label="unscaled")
    b.plot(dims, scaled_max_weight, "s-", label="scaled")
    b.set_xscale("log", base=2)
    b.set_ylim(0, 1.05)
    b.set_xlabel("d_k")
    b.set_title("mean largest softmax weight in a row", fontsize=9)
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


plot_heatmap = heatmap  # the name course_lib/viz/__init__.py uses in its example
