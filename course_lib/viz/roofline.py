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
    (a key of :data:`STYLES`); a point whose ``bound`` is ``"overhead-bound"``
    (:func:`measured_bound`) is drawn hollow. Returns the figure. Axes are log-log; FLOP/s shown in GFLOP/s.
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
    seen, any_hollow = set(), False
    for p in points:
        kind = p.get("kind", "other")
        style = STYLES.get(kind, STYLES["other"])
        hollow = p.get("bound") == "overhead-bound"
        ax.plot(p["intensity"], p["flops_per_s"] / 1e9, ls="none", ms=7, **style,
                markerfacecolor="none" if hollow else style["color"],
                label=kind if kind not in seen else None)
        seen.add(kind)
        any_hollow = any_hollow or hollow
        if annotate and p.get("label"):
            ax.annotate(p["label"], (p["intensity"], p["flops_per_s"] / 1e9), fontsize=7,
                        xytext=(4, -10 if kind == "decode" else 4), textcoords="offset points")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(title or f"Roofline of {ceilings.name} [{ceilings.dtype}]", fontsize=10)
    if any_hollow:   # say on the figure what the hollow markers mean
        ax.plot([], [], ls="none", marker="o", color="gray", markerfacecolor="none",
                label="hollow: overhead-bound\n(< 25 % of both roofs)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.2)
    return fig


def bound_of(ceilings, intensity: float) -> str:
    """``"memory-bound"`` left of the ridge, ``"compute-bound"`` right of it."""
    return "memory-bound" if intensity < ceilings.ridge else "compute-bound"


def roof_fractions(ceilings, flops_per_s: float, bytes_per_s: float) -> dict:
    """How much of each measured roof a step used: achieved FLOP/s / peak, bytes/s / bandwidth."""
    if flops_per_s < 0 or bytes_per_s < 0:
        raise InputError(f"achieved rates must be >= 0, got {flops_per_s} FLOP/s and {bytes_per_s} B/s")
    return {"compute": flops_per_s / ceilings.peak_flops, "memory": bytes_per_s / ceilings.bandwidth}


def measured_bound(ceilings, flops_per_s: float, bytes_per_s: float, explained: float = 0.25) -> str:
    """The label a *measurement* earns: which roof the step came close to, if either.

    ``"compute-bound"`` or ``"memory-bound"`` when the step used at least ``explained`` of that
    roof (the larger share wins); ``"overhead-bound"`` when it used less than ``explained`` of
    both: then neither the arithmetic nor the memory explains its time, and fixed costs (Python,
    kernel launches, synchronisation) do. :func:`bound_of` says only which roof *could* limit a
    step of that intensity. Introduced in notebooks/10_prefill_vs_decode_on_your_hardware.ipynb.
    """
    if not 0 < explained <= 1:
        raise InputError(f"explained must be a share in (0, 1], got {explained}")
    f = roof_fractions(ceilings, flops_per_s, bytes_per_s)
    if max(f.values()) < explained:
        return "overhead-bound"
    return "compute-bound" if f["compute"] >= f["memory"] else "memory-bound"
