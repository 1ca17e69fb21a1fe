"""The roofline: attainable FLOP/s against arithmetic intensity, with measured points on it.

``attainable(I) = min(peak FLOP/s, bandwidth × I)``. Left of the ridge ``peak / bandwidth`` a
kernel waits for memory (memory-bound), right of it for the arithmetic units (compute-bound).
Both ceilings are measured on this machine by :func:`course_lib.perf.measure_ceilings`.
Introduced in notebooks/10_prefill_vs_decode_on_your_hardware.ipynb.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..errors import InputError

#: Marker and colour per kind of point, so prefill and decode read the same in every figure.
STYLES = {
    "prefill": dict(marker="o", color="tab:blue"),
    "decode": dict(marker="s", color="tab:red"),
    "gemm": dict(marker="^", color="tab:green"),
    "gemv": dict(marker="v", color="tab:orange"),
    "other": dict(marker="D", color="tab:gray"),
}


def roof_curve(peak_flops: float, bandwidth: float, intensities) -> np.ndarray:
    """``min(peak, bandwidth × I)`` for each intensity ``I`` (FLOP/byte)."""
    if peak_flops <= 0 or bandwidth <= 0:
        raise InputError(f"peak ({peak_flops}) and bandwidth ({bandwidth}) must be positive; "
                         "measure them with course_lib.perf.measure_ceilings()")
    i = np.asarray(intensities, dtype=float)
    return np.minimum(peak_flops, bandwidth * i)


def plot_roofline(ceilings, points=(), ax=None, title: str | None = None, annotate: bool = True,
                  x_range=None):
    """Draw the measured roofline of ``ceilings`` and the measured ``points`` on it.

    ``points``: dicts with ``intensity`` (FLOP/byte), ``flops_per_s``, ``label`` and ``kind``
    (a key of :data:`STYLES`). Returns the figure. Axes are log-log; FLOP/s shown in GFLOP/s.
    """
    points = list(points)
    for p in points:
        if p.get("intensity", 0) <= 0 or p.get("flops_per_s", 0) <= 0:
            raise InputError(f"a roofline point needs positive 'intensity' and 'flops_per_s', got {p}")
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
    else:
        fig = ax.figure
    xs = [p["intensity"] for p in points] + [ceilings.ridge]
    lo, hi = x_range or (min(xs) / 3, max(xs) * 3)
    grid = np.logspace(np.log10(lo), np.log10(hi), 200)
    roof = roof_curve(ceilings.peak_flops, ceilings.bandwidth, grid)
    ax.loglog(grid, roof / 1e9, color="black", lw=2, label="measured roofline")
    ax.axvline(ceilings.ridge, color="gray", ls=":", lw=1)
    ax.text(ceilings.ridge * 1.08, 0.03, f"ridge {ceilings.ridge:.1f} FLOP/B", fontsize=8, color="gray",
            transform=ax.get_xaxis_transform(), ha="left", va="bottom")
    ax.text(lo * 1.2, ceilings.bandwidth * lo * 1.2 / 1e9, f"{ceilings.bandwidth / 1e9:,.0f} GB/s",
            fontsize=8, va="bottom")
    ax.text(ceilings.ridge * 1.08, ceilings.peak_flops / 1e9 * 1.06, f"peak {ceilings.peak_flops / 1e9:,.0f} GFLOP/s",
            fontsize=8, ha="left", va="bottom")
    ymin = min([p["flops_per_s"] for p in points] + [roof[0]]) / 1e9
    ax.set_ylim(ymin / 1.5, ceilings.peak_flops / 1e9 * 1.8)
    seen = set()
    for p in points:
        kind = p.get("kind", "other")
        style = STYLES.get(kind, STYLES["other"])
        ax.plot(p["intensity"], p["flops_per_s"] / 1e9, ls="none", ms=7, **style,
                label=kind if kind not in seen else None)
        seen.add(kind)
        if annotate and p.get("label"):
            ax.annotate(p["label"], (p["intensity"], p["flops_per_s"] / 1e9), fontsize=7,
                        xytext=(4, -10 if kind == "decode" else 4), textcoords="offset points")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(title or f"Roofline of {ceilings.name} [{ceilings.dtype}]", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.2)
    return fig


def bound_of(ceilings, intensity: float) -> str:
    """``"memory-bound"`` left of the ridge, ``"compute-bound"`` right of it."""
    return "memory-bound" if intensity < ceilings.ridge else "compute-bound"
