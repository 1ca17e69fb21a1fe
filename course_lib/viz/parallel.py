"""Pictures of work spread over devices (notebooks/13_many_devices.ipynb).

:func:`schedule_figure` draws a pipeline schedule as a Gantt chart, one row per stage, from
``(stage, item, start, end)`` intervals (measured by :mod:`course_lib.parallel`, or simulated by
:func:`course_lib.parallel.ideal_schedule`), with the idle gaps hatched. :func:`tp_split_figure`
shows where a tensor-parallel forward spends its time (compute vs all-reduce) and how many bytes
each all-reduce moves; :func:`tp_sharding_figure` shows which rank holds which columns and rows.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from matplotlib.ticker import LogLocator

from ..errors import InputError

RANK_COLORS = ["#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2", "#eeca3b", "#9d755d"]


def _idle_spans(rows, stage, t0, t1):
    spans = sorted((r[2], r[3]) for r in rows if r[0] == stage)
    gaps, cursor = [], t0
    for a, b in spans:
        if a > cursor:
            gaps.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < t1:
        gaps.append((cursor, t1))
    return gaps


def schedule_figure(intervals, n_stages: int, ax=None, title: str | None = None, item: str = "micro-batch",
                    unit: str = "ms", xmax: float | None = None):
    """Gantt chart of a schedule: stage rows, one bar per item (labelled with its number), idle hatched.

    ``intervals``: ``(stage, item, start, end)`` in seconds (``unit="ms"``) or in abstract steps
    (``unit="steps"``). Colour only repeats the item number written in each bar. Returns the figure.
    """
    rows = [tuple(r) for r in intervals]
    if not rows:
        raise InputError("schedule_figure needs at least one (stage, item, start, end) interval")
    if any(not 0 <= int(r[0]) < n_stages for r in rows):
        raise InputError(f"every interval's stage must be in 0..{n_stages - 1}")
    scale = 1e3 if unit == "ms" else 1.0
    if ax is None:
        fig, ax = plt.subplots(figsize=(9, 0.55 * n_stages + 1.3))
    else:
        fig = ax.figure
    t0 = min(r[2] for r in rows)
    t1 = max(r[3] for r in rows)
    n_items = int(max(r[1] for r in rows)) + 1
    cmap = plt.get_cmap("tab20" if n_items > 10 else "tab10")
    for s, j, a, b in rows:
        y = n_stages - 1 - int(s)
        ax.barh(y, (b - a) * scale, left=(a - t0) * scale, height=0.7, color=cmap(int(j) % cmap.N),
                edgecolor="black", lw=0.6)
        if (b - a) / (t1 - t0) > 0.025:
            ax.text(((a + b) / 2 - t0) * scale, y, str(int(j)), ha="center", va="center", fontsize=8)
    for s in range(n_stages):
        for a, b in _idle_spans(rows, s, t0, t1):
            ax.add_patch(Rectangle(((a - t0) * scale, n_stages - 1 - s - 0.35), (b - a) * scale, 0.7,
                                   fill=False, hatch="///", ec="#999999", lw=0))
    ax.set_yticks(range(n_stages))
    ax.set_yticklabels([f"stage {s}" for s in reversed(range(n_stages))], fontsize=9)
    ax.set_xlim(0, (xmax if xmax is not None else (t1 - t0)) * scale)
    ax.set_ylim(-0.6, n_stages - 0.4)
    ax.set_xlabel(_time_label(unit, item), fontsize=9)
    ax.tick_params(labelsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def _time_label(unit: str, item: str) -> str:
    what = "time (ms)" if unit == "ms" else "time (steps of one stage)"
    return f"{what}        bars: one {item} each (its number inside); hatched: idle"


def schedules_figure(runs: list[dict], n_stages: int, ideal=None, item: str = "micro-batch"):
    """One measured schedule per run (``{"n_micro", "intervals"}``), on a shared time axis.

    ``ideal(p, m)`` (e.g. :func:`course_lib.parallel.ideal_bubble`) adds the formula's bubble
    to each panel's title beside the measured one.
    """
    from ..parallel import bubble_fraction

    if not runs:
        raise InputError("schedules_figure needs at least one run")
    spans = [max(r[3] for r in run["intervals"]) - min(r[2] for r in run["intervals"]) for run in runs]
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, (0.45 * n_stages + 0.75) * len(runs) + 0.4),
                             sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        m = run["n_micro"]
        text = f"m = {m} {item}{'es' if item.endswith('h') and m > 1 else 's' if m > 1 else ''}: " \
               f"bubble measured {bubble_fraction(run['intervals'], n_stages):.2f}"
        if ideal is not None:
            text += f", (p−1)/(m+p−1) = {ideal(n_stages, m):.2f}"
        schedule_figure(run["intervals"], n_stages, ax=ax, item=item, xmax=max(spans))
        ax.set_title(text, fontsize=9, loc="left")
        ax.set_xlabel("")
    axes[-1, 0].set_xlabel(_time_label("ms", item), fontsize=9)
    fig.tight_layout()
    return fig


def tp_split_figure(timings: dict, allreduce_bench: list | None = None):
    """Where a tensor-parallel forward's time goes, and what the all-reduces move.

    ``timings``: model name → rows ``{"T", "compute", "all_reduce", "bytes_per_allreduce",
    "n_allreduce"}`` (seconds, of one rank), optionally with ``"transfer"`` and ``"waiting"``
    (the all-reduce time split, see :func:`course_lib.parallel.run_tensor_parallel`). Left:
    compute and all-reduce time per prompt length, stacked; middle: bytes per all-reduce; right (with ``allreduce_bench``, rows ``{"bytes",
    "seconds"}``): one bare all-reduce's time against its size.
    """
    if not timings:
        raise InputError("tp_split_figure needs the timings of at least one model")
    n_panels = 3 if allreduce_bench else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.6, 1, 1][:n_panels]})
    ax_t, ax_b = axes[0], axes[1]
    names = list(timings)
    lengths = sorted({row["T"] for rows in timings.values() for row in rows})
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        by_T = {row["T"]: row for row in timings[name]}
        x = np.arange(len(lengths)) + (k - (len(names) - 1) / 2) * width
        comp = np.array([by_T[T]["compute"] * 1e3 if T in by_T else 0 for T in lengths])
        if all("transfer" in r for r in by_T.values()):
            parts = [("transfer", "all-reduce: transfer", "#e45756"), ("waiting", "all-reduce: waiting", "#f2b8b5")]
        else:
            parts = [("all_reduce", "all-reduce (incl. waiting)", "#e45756")]
        ax_t.bar(x, comp, width * 0.95, color="#4c78a8", edgecolor="black", lw=0.5,
                 label="compute" if k == 0 else None)
        bottom = comp.copy()
        for key, label, color in parts:
            vals = np.array([by_T[T][key] * 1e3 if T in by_T else 0 for T in lengths])
            ax_t.bar(x, vals, width * 0.95, bottom=bottom, color=color, edgecolor="black", lw=0.5,
                     label=label if k == 0 else None)
            bottom = bottom + vals
        transfer = np.array([by_T[T][parts[0][0]] * 1e3 if T in by_T else 0 for T in lengths])
        for xi, c, tr, top in zip(x, comp, transfer, bottom):
            if c + tr > 0:
                ax_t.text(xi, top, f"{name}\n{tr / (c + tr):.0%}", ha="center", va="bottom", fontsize=7)
        bts = [by_T[T]["bytes_per_allreduce"] / 1024 if T in by_T else 0 for T in lengths]
        ax_b.bar(np.arange(len(lengths)) + (k - (len(names) - 1) / 2) * width, bts, width * 0.95,
                 color=RANK_COLORS[k % len(RANK_COLORS)], label=name)
    ax_t.set_xticks(range(len(lengths)))
    ax_t.set_xticklabels([f"T = {T}" for T in lengths], fontsize=8)
    ax_t.set_ylabel("ms per forward (one rank)", fontsize=9)
    ax_t.set_title("compute vs all-reduce (label: transfer / (compute + transfer))", fontsize=9)
    ax_t.legend(fontsize=8, loc="upper left")
    ax_t.margins(y=0.3)
    ax_b.set_xticks(range(len(lengths)))
    ax_b.set_xticklabels([str(T) for T in lengths], fontsize=8)
    ax_b.set_xlabel("prompt length T", fontsize=9)
    ax_b.set_ylabel("KiB per all-reduce", fontsize=9)
    ax_b.set_title("bytes of each all-reduce = B·T·D·4", fontsize=9)
    ax_b.legend(fontsize=8)
    for ax in axes:
        ax.tick_params(labelsize=8)
    if allreduce_bench:
        ax_r = axes[2]
        nb = np.array([r["bytes"] for r in allreduce_bench], dtype=float)
        sec = np.array([r["seconds"] for r in allreduce_bench], dtype=float)
        order = np.argsort(nb)
        ax_r.loglog(nb[order], sec[order] * 1e3, "o-", color="#e45756")
        ax_r.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax_r.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax_r.yaxis.set_minor_formatter(plt.NullFormatter())
        ax_r.set_xlabel("bytes all-reduced", fontsize=9)
        ax_r.set_ylabel("ms (best of repeats)", fontsize=9)
        ax_r.set_title("one bare all-reduce", fontsize=9)
        ax_r.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def tp_sharding_figure(n_head: int, world_size: int, mlp_ratio: int = 4):
    """Which rank holds which part of one layer: column split of W_qkv and W_fc, row split of W_o and W_proj.

    Each matrix is drawn to scale (``in × out``, D = 1 unit); colour = rank, as the legend says.
    """
    if n_head % world_size:
        raise InputError(f"{world_size} ranks cannot split {n_head} heads evenly")
    fig, ax = plt.subplots(figsize=(10, 3.4))
    D = 1.0
    F = mlp_ratio * D

    def matrix(x0, w, h, split, label, sub, parts=1):
        for r in range(world_size):
            if split == "cols":
                block = w / parts                             # q | k | v are three blocks of D columns
                for part in range(parts):
                    ax.add_patch(Rectangle((x0 + part * block + r * block / world_size, 0), block / world_size, h,
                                           color=RANK_COLORS[r], ec="black", lw=0.6))
            else:
                ax.add_patch(Rectangle((x0, h - (r + 1) * h / world_size), w, h / world_size,
                                       color=RANK_COLORS[r], ec="black", lw=0.6))
        ax.text(x0 + w / 2, h + 0.12, label, ha="center", fontsize=9)
        ax.text(x0 + w / 2, -0.18, sub, ha="center", va="top", fontsize=8)

    x = 0.0
    matrix(x, 3, D, "cols", "W_qkv  (D × 3D)", "columns: q | k | v\nof each rank's heads", parts=3)
    x += 3 + 0.5
    matrix(x, 1, D, "rows", "W_o  (D × D)", "rows:\nthe same heads")
    ax.annotate("", xy=(x + 1.45, D / 2), xytext=(x + 1.05, D / 2), arrowprops=dict(arrowstyle="->"))
    ax.text(x + 1.25, D / 2 + 0.1, "all-\nreduce", ha="center", va="bottom", fontsize=8, color="#b00020")
    x += 1 + 0.6
    matrix(x, F, D, "cols", "W_fc  (D × 4D)", "columns:\neach rank's MLP units")
    x += F + 0.5
    matrix(x, 1, F / 2, "rows", "W_proj  (4D × D, drawn ½)", "rows:\nthe same units")
    ax.annotate("", xy=(x + 1.45, D / 2), xytext=(x + 1.05, D / 2), arrowprops=dict(arrowstyle="->"))
    ax.text(x + 1.25, D / 2 + 0.1, "all-\nreduce", ha="center", va="bottom", fontsize=8, color="#b00020")
    for r in range(world_size):
        ax.add_patch(Rectangle((0, 0), 0, 0, color=RANK_COLORS[r], label=f"rank {r}"))
    ax.legend(loc="upper left", fontsize=8, ncol=world_size, frameon=False)
    ax.set_xlim(-0.2, x + 1.6)
    ax.set_ylim(-0.6, F / 2 + 0.4)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"tensor parallel over {world_size} ranks: column split, then row split "
                 f"({n_head // world_size} of {n_head} heads per rank)", fontsize=10, loc="left")
    return fig
