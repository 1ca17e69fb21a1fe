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


def batches(results) -> list[int]:
    return sorted({b for b, _ in results["tpot"]})


def contexts(results) -> list[int]:
    return sorted({c for _, c in results["tpot"]})


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


def build_timing_widget(results: dict, device_label: str = ""):
    """A dropdown for the view and a slider for the batch (or context) held fixed."""
    import ipywidgets as W
    from IPython.display import display

    view = W.Dropdown(options=[(v, k) for k, v in VIEWS.items()], value="ttft", description="plot")
    fixed = W.SelectionSlider(options=batches(results), description="batch")
    out = W.Output()

    def redraw(*_):
        if view.value == "tpot_batch" and fixed.description != "context":
            fixed.description, fixed.options = "context", contexts(results)
        elif view.value != "tpot_batch" and fixed.description != "batch":
            fixed.description, fixed.options = "batch", batches(results)
        fixed.disabled = view.value in ("ttft", "ttft_per_token")
        with out:
            out.clear_output(wait=True)
            fig = draw_timing(results, view.value, fixed.value, device_label=device_label)
            display(fig)
            plt.close(fig)

    view.observe(redraw, names="value")
    fixed.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox([view, fixed]), out])
