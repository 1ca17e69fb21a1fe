"""Explore measured TTFT and TPOT: the logic behind notebook 10's timing widget.

``results`` is a plain dict filled by the notebook's measurements:

* ``"ttft"``: ``{prompt_len: seconds}`` of prefill at batch 1 (time to first token);
* ``"tpot"``: ``{(batch, context): seconds}`` of one decode step (time per output token).

:func:`timing_series` picks one curve out of it; :func:`draw_timing` plots it;
:func:`build_timing_widget` puts a dropdown (what to plot) and a slider (the batch or context
held fixed) on top. Introduced in notebooks/10_prefill_vs_decode_on_your_hardware.ipynb.
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from ..errors import InputError

VIEWS = {
    "ttft": "TTFT vs prompt length",
    "ttft_per_token": "prefill time per prompt token vs prompt length",
    "tpot_context": "TPOT vs context (batch fixed)",
    "tpot_batch": "TPOT and tokens/s vs batch (context fixed)",
}


#: A curve needs at least this many measured points to be offered by the widget's slider.
MIN_POINTS = 3


def batches(results, min_points: int = 1) -> list[int]:
    """The measured batch sizes that have decode timings at ``min_points`` contexts or more."""
    all_b = sorted({b for b, _ in results["tpot"]})
    return [b for b in all_b if sum(1 for bb, _ in results["tpot"] if bb == b) >= min_points]


def contexts(results, min_points: int = 1) -> list[int]:
    """The measured contexts that have decode timings at ``min_points`` batch sizes or more."""
    all_c = sorted({c for _, c in results["tpot"]})
    return [c for c in all_c if sum(1 for _, cc in results["tpot"] if cc == c) >= min_points]


def timing_series(results: dict, view: str, fixed: int | None = None) -> dict:
    """One curve: ``x``, ``y`` (milliseconds) and axis labels; ``fixed`` is the batch or context."""
    if view not in VIEWS:
        raise InputError(f"view must be one of {list(VIEWS)}, got {view!r}")
    if view in ("ttft", "ttft_per_token"):
        xs = sorted(results["ttft"])
        ys = [results["ttft"][x] * 1e3 / (x if view == "ttft_per_token" else 1) for x in xs]
        return {"x": xs, "y": ys, "xlabel": "prompt length (tokens)",
                "ylabel": "ms per prompt token" if view == "ttft_per_token" else "TTFT (ms)",
                "title": VIEWS[view]}
    if view == "tpot_context":
        b = fixed if fixed is not None else batches(results)[0]
        xs = [c for c in contexts(results) if (b, c) in results["tpot"]]
        if not xs:
            raise InputError(f"no decode timing at batch {b}; measured batches: {batches(results)}")
        return {"x": xs, "y": [results["tpot"][(b, c)] * 1e3 for c in xs], "xlabel": "context (cached tokens)",
                "ylabel": "TPOT (ms per step)", "title": f"TPOT vs context at batch {b}"}
    c = fixed if fixed is not None else contexts(results)[0]
    xs = [b for b in batches(results) if (b, c) in results["tpot"]]
    if not xs:
        raise InputError(f"no decode timing at context {c}; measured contexts: {contexts(results)}")
    ys = [results["tpot"][(b, c)] * 1e3 for b in xs]
    return {"x": xs, "y": ys, "tokens_per_s": [b / (y / 1e3) for b, y in zip(xs, ys)],
            "xlabel": "batch (sequences decoded together)", "ylabel": "TPOT (ms per step)",
            "title": f"TPOT vs batch at context {c}"}


def draw_timing(results: dict, view: str, fixed: int | None = None, ax=None, device_label: str = ""):
    s = timing_series(results, view, fixed)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.6))
    else:
        fig = ax.figure
    ax.plot(s["x"], s["y"], "o-", color="tab:blue")
    ax.set_xlabel(s["xlabel"])
    ax.set_ylabel(s["ylabel"])
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    if "tokens_per_s" in s:
        ax2 = ax.twinx()
        ax2.plot(s["x"], s["tokens_per_s"], "s--", color="tab:red")
        ax2.set_ylabel("tokens/s (all sequences)", color="tab:red")
        ax2.set_ylim(bottom=0)
    ax.set_title(s["title"] + (f"\n{device_label}" if device_label else ""), fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def _fixed_options(results: dict, view: str) -> tuple[str, list[int]]:
    """The slider's name and positions for ``view``: only values whose curve has several points."""
    if view == "tpot_batch":
        return "context", contexts(results, MIN_POINTS) or contexts(results)
    return "batch", batches(results, MIN_POINTS) or batches(results)


def build_timing_widget(results: dict, device_label: str = ""):
    """A dropdown for the view and a slider for the batch (or context) held fixed.

    The figure is drawn once; a change puts the chosen curve into its lines and rescales the
    axes. Returns a VBox of ``[HBox(dropdown, slider), image]``; ``box.fig`` is the figure and
    ``box.redraw()`` the callback."""
    import ipywidgets as W

    from .common import canvas_png, detach_figure

    view = W.Dropdown(options=[(v, k) for k, v in VIEWS.items()], value="ttft", description="plot",
                      layout=W.Layout(width="430px"))     # wide enough for the longest label
    name, opts = _fixed_options(results, "ttft")
    fixed = W.SelectionSlider(options=opts, description=name, layout=W.Layout(width="320px"))
    image = W.Image(format="png", layout=W.Layout(max_width="100%"))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    detach_figure(fig)
    (line,) = ax.plot([], [], "o-", color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    (line2,) = ax2.plot([], [], "s--", color="tab:red")
    ax2.set_ylabel("tokens/s (all sequences)", color="tab:red")
    fig.subplots_adjust(left=0.12, right=0.86, bottom=0.16, top=0.84)
    busy = [False]

    def redraw(*_):
        if busy[0]:
            return
        name, opts = _fixed_options(results, view.value)
        if fixed.description != name or list(fixed.options) != opts:
            busy[0] = True                        # changing the options moves the value: one redraw
            try:
                fixed.description, fixed.options = name, opts
            finally:
                busy[0] = False
        fixed.disabled = view.value in ("ttft", "ttft_per_token") or len(opts) < 2
        s = timing_series(results, view.value, fixed.value)
        line.set_data(s["x"], s["y"])
        ax.set_xlabel(s["xlabel"])
        ax.set_ylabel(s["ylabel"])
        ax.relim()
        ax.autoscale_view()
        ax.set_ylim(0, 1.1 * max(s["y"]))
        ax.set_title(s["title"] + (f"\n{device_label}" if device_label else ""), fontsize=9)
        ax2.set_visible("tokens_per_s" in s)
        if "tokens_per_s" in s:
            line2.set_data(s["x"], s["tokens_per_s"])
            ax2.set_ylim(0, 1.1 * max(s["tokens_per_s"]))
        image.value = canvas_png(fig, 80)

    view.observe(redraw, names="value")
    fixed.observe(redraw, names="value")
    redraw()
    box = W.VBox([W.HBox([view, fixed]), image])
    box.fig, box.redraw = fig, redraw
    return box
