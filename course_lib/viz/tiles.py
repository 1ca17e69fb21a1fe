"""Pictures of tiled attention (notebooks/12_flash_attention.ipynb).

* :class:`OnlineSoftmaxFigure` — one query row processed tile by tile: the scores with the tiles
  seen so far, the running maximum and sum after every tile, and the partial output against the
  final one. Built once; :meth:`~OnlineSoftmaxFigure.show_step` moves its artists (the widget and
  the static figure both use it).
* :class:`TileGridFigure` (:func:`draw_tile_grid`) — which (query tile, key tile) pairs a causal kernel skips, computes, or
  masks, from the grid that :func:`course_lib.tiled.tiled_causal_attention` counted.
* :func:`plot_skipped_fraction`, :func:`plot_split_kv`, :func:`plot_kernel_times` — the counts,
  the split-KV partials and the GPU timing as small charts.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import BoundaryNorm, ListedColormap

TILE_COLORS = ["#eeeeee", "#4c72b0", "#dd8452"]          # skipped, full, masked (diagonal)
TILE_LABELS = ["skipped", "computed", "computed + mask"]
SEEN, UNSEEN = "#4c72b0", "#cccccc"


class OnlineSoftmaxFigure:
    """Three panels for an :class:`~course_lib.tiled.OnlineSoftmaxRun`, drawn once.

    Left: the row's scores, tiles already folded in coloured, the running maximum as a line.
    Middle: running max ``m`` and running sum ``l`` after every tile (a marker at the current one).
    Right: the partial output ``acc / l`` after this tile against the final output.
    """

    def __init__(self, run, step: int | None = None, figsize=(10, 3.4)):
        self.run = run
        S, n = len(run.scores), run.n_tiles
        self.fig, (self.ax_s, self.ax_m, self.ax_o) = plt.subplots(
            1, 3, figsize=figsize, gridspec_kw={"width_ratios": [1.5, 1, 1]})
        self.bars = self.ax_s.bar(np.arange(S), run.scores, color=UNSEEN, width=0.9)
        for a, _ in run.bounds[1:]:
            self.ax_s.axvline(a - 0.5, color="black", lw=0.6, ls=":")
        self.max_line = self.ax_s.axhline(run.scores.max(), color="tab:red", lw=1.2)
        self.ax_s.set_xlabel("key position (dotted: tile edges)", fontsize=8)
        self.ax_s.set_ylabel("score q·k / √Dh", fontsize=8)

        ms = [s.m for s in run.states]
        ls = [s.l for s in run.states]
        x = np.arange(n)
        self.ax_m.plot(x, ms, "o-", color="tab:red", ms=3, label="running max m")
        self.ax_m.set_xlabel("tiles folded in", fontsize=8)
        self.ax_m.set_ylabel("m", color="tab:red", fontsize=8)
        self.ax_l = self.ax_m.twinx()
        self.ax_l.plot(x, ls, "s-", color="tab:green", ms=3, label="running sum l")
        self.ax_l.set_ylabel("l = Σ exp(score − m)", color="tab:green", fontsize=8)
        self.ax_m.set_xticks(x)
        self.ax_m.set_xticklabels([str(i + 1) for i in x], fontsize=7)
        self.mark_m, = self.ax_m.plot([0], [ms[0]], "o", color="black", ms=7, mfc="none")
        self.mark_l, = self.ax_l.plot([0], [ls[0]], "s", color="black", ms=7, mfc="none")

        final = run.states[-1].output
        Dh = len(final)
        d = np.arange(Dh)
        self.ax_o.bar(d, final, color="#dddddd", width=0.9, label="final output")
        self.out_line, = self.ax_o.plot(d, run.states[0].output, "o", color=SEEN, ms=3,
                                        label="acc / l after this tile")
        lim = max(np.abs(np.stack([s.output for s in run.states])).max(), 1e-9) * 1.1
        self.ax_o.set_ylim(-lim, lim)
        self.ax_o.set_xlabel("head dimension", fontsize=8)
        self.ax_o.legend(fontsize=7, loc="lower right")
        for ax in (self.ax_s, self.ax_m, self.ax_l, self.ax_o):
            ax.tick_params(labelsize=7)
        self.ax_s.set_title("scores (blue: folded in; red: running max)", fontsize=9)
        self.ax_m.set_title("running max m and sum l", fontsize=9)
        self.ax_o.set_title("partial output acc / l vs final", fontsize=9)
        self.title = self.fig.suptitle(" ", fontsize=10)
        self.fig.tight_layout()
        self.show_step(n - 1 if step is None else step)

    def show_step(self, step: int) -> None:
        """Move the artists to the state after tile ``step`` (0-based)."""
        run, st = self.run, self.run.states[step]
        end = run.bounds[step][1]
        for i, b in enumerate(self.bars):
            b.set_color(SEEN if i < end else UNSEEN)
        self.max_line.set_ydata([st.m, st.m])
        self.mark_m.set_data([step], [st.m])
        self.mark_l.set_data([step], [st.l])
        self.out_line.set_ydata(st.output)
        alpha = run.alphas[step]
        rescale = "nothing to rescale yet" if step == 0 else f"old l and acc × exp(m_old − m_new) = {alpha:.3f}"
        self.title.set_text(f"tile {step + 1} of {run.n_tiles}: keys 0..{end - 1} folded in, "
                            f"running max m = {st.m:.2f}, {rescale}")
        self.fig.canvas.draw_idle()


class TileGridFigure:
    """The (query tile × key tile) grid of a tiled causal attention, coloured by what the loop did,
    with the tile edges and the true causal boundary (dashed) over it. :meth:`show` moves the
    artists to other counts (the widget calls it; the figure is built once)."""

    def __init__(self, counts, tile_q: int, tile_k: int, T: int, ax=None, title: str | None = None):
        if ax is None:
            fig, ax = plt.subplots(figsize=(4.8, 4.2))
        self.ax, self.fig = ax, ax.figure
        cmap = ListedColormap(TILE_COLORS)
        norm = BoundaryNorm([-0.5, 0.5, 1.5, 2.5], cmap.N)
        self.img = ax.imshow(counts.grid, cmap=cmap, norm=norm, interpolation="nearest")
        self.edges = LineCollection([], colors="white", linewidths=0.8)
        ax.add_collection(self.edges)
        self.diagonal, = ax.plot([0, T], [0, T], color="black", lw=1, ls="--")
        ax.set_xlabel("key position", fontsize=8)
        ax.set_ylabel("query position", fontsize=8)
        ax.tick_params(labelsize=7)
        cbar = self.fig.colorbar(self.img, ax=ax, ticks=[0, 1, 2], fraction=0.046, pad=0.04)
        cbar.ax.set_yticklabels(TILE_LABELS, fontsize=7)
        self.show(counts, tile_q, tile_k, T, title)

    def show(self, counts, tile_q: int, tile_k: int, T: int, title: str | None = None) -> None:
        nq, nk = counts.grid.shape
        self.img.set_data(counts.grid)
        self.img.set_extent((0, nk * tile_k, nq * tile_q, 0))
        self.edges.set_segments([[(min(j * tile_k, T), 0), (min(j * tile_k, T), T)] for j in range(nk + 1)]
                                + [[(0, min(i * tile_q, T)), (T, min(i * tile_q, T))] for i in range(nq + 1)])
        self.diagonal.set_data([0, T], [0, T])
        self.ax.set_xlim(0, T)
        self.ax.set_ylim(T, 0)
        self.ax.set_title(title or (f"T = {T}, tiles {tile_q}×{tile_k}: {counts.pairs_done} of "
                                    f"{counts.pairs_total} tile pairs computed\n"
                                    f"{counts.fraction_skipped:.0%} of the multiply-adds skipped"), fontsize=9)
        self.fig.canvas.draw_idle()


def draw_tile_grid(counts, tile_q: int, tile_k: int, T: int, ax=None, title: str | None = None):
    """A :class:`TileGridFigure` drawn once; returns the figure."""
    return TileGridFigure(counts, tile_q, tile_k, T, ax=ax, title=title).fig


def plot_skipped_fraction(lengths, fractions, tile: int, ax=None):
    """Share of the full rectangle's multiply-adds a causal tiled loop skipped, against T."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.8, 3.2))
    else:
        fig = ax.figure
    ax.plot(lengths, fractions, "o-", color=TILE_COLORS[1])
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(lengths))
    ax.set_xticklabels([str(t) for t in lengths], fontsize=7)
    ax.set_ylim(0, 0.55)
    ax.set_xlabel("sequence length T", fontsize=8)
    ax.set_ylabel("multiply-adds skipped", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(f"causal tiles of {tile}: the skipped share → 1/2 (dashed)", fontsize=9)
    return fig


def plot_split_kv(split, head: int = 0, ax=None):
    """Each key range's partial maximum and sum for one head of a :class:`~course_lib.tiled.SplitDecode`:
    independent pieces, rescaled to the global maximum when merged."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.0))
    else:
        fig = ax.figure
    parts = split.partials[head]
    m_all = max(p.m for p in parts)
    x = np.arange(len(parts))
    weight = np.array([p.l * np.exp(p.m - m_all) for p in parts])
    ax.bar(x, weight / weight.sum(), color=TILE_COLORS[1])
    ax.set_xticks(x)
    ax.set_xticklabels([f"{a}–{b - 1}" for a, b in split.ranges], rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("key range (one independent work item each)", fontsize=8)
    ax.set_ylabel("share of the softmax mass", fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(x, [p.m for p in parts], "o", color="tab:red", ms=4)
    ax2.axhline(m_all, color="tab:red", lw=0.8, ls="--")
    ax2.set_ylabel("partial max m (red; dashed: global)", color="tab:red", fontsize=8)
    for a in (ax, ax2):
        a.tick_params(labelsize=7)
    ax.set_title(f"head {head}: {len(parts)} partial (m, l, acc) merged by rescaling to the global max",
                 fontsize=9)
    return fig


def plot_kernel_times(labels, seconds, causal, ax=None, title: str = ""):
    """Horizontal bars of kernel times in milliseconds; ``causal[i]`` colours bar ``i`` orange."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(labels)))
    else:
        fig = ax.figure
    ms = [1e3 * s for s in seconds]
    ax.barh(range(len(labels)), ms, color=[TILE_COLORS[2] if c else TILE_COLORS[1] for c in causal])
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(ms):
        ax.text(v, i, f" {v:.3f} ms", va="center", fontsize=8)
    ax.set_xlim(0, max(ms) * 1.3)
    ax.set_xlabel("best time (ms)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    return fig
