"""Pictures of the KV cache as decode grows it (notebooks/08_decode_and_kv_cache.ipynb).

:func:`draw_cache_view` draws one view from :func:`course_lib.widgets.cache.cache_view`:
the cached K or V rows of one layer and head (on a canvas as long as the final cache, so the
growth shows), the occupancy of every layer and head, and the new query's attention row over
the cached keys. :func:`plot_cache_bytes` compares the byte formula with the bytes allocated.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .attention import tick_step


def draw_cache_view(view: dict, fig=None):
    """Three panels for one step: cached rows, occupancy per layer × head, attention row.

    The panels are as long as the final cache, so that a later step only changes values:
    the artists are kept in ``fig.course_handles`` for :func:`update_cache_view`."""
    M, P = view["max_len"], view["prompt_len"]
    L, H = view["n_layer"], view["n_head"]
    if fig is None:
        fig = plt.figure(figsize=(10, 3.8))
    gs = fig.add_gridspec(1, 3, width_ratios=[1.1, 0.9, 1.4], wspace=0.4)
    ax_rows, ax_occ, ax_att = (fig.add_subplot(gs[0, i]) for i in range(3))
    h = {}
    h["rows"] = ax_rows.imshow(np.full((M, view["rows"].shape[1]), np.nan), aspect="auto", cmap="RdBu_r",
                               interpolation="nearest")
    ax_rows.axhline(P - 0.5, color="black", lw=0.8, ls="--")
    h["rows_title"] = ax_rows.set_title("", fontsize=9)
    ax_rows.set_xlabel("head dim")
    ax_rows.set_ylabel("position (dashed: end of prompt)")

    h["occ"] = ax_occ.imshow(np.zeros((L * H, M)), aspect="auto", vmin=0, vmax=2, interpolation="nearest",
                             cmap=plt.matplotlib.colors.ListedColormap(["#eeeeee", "#7fa7d6", "#d6604d"]))
    ax_occ.set_yticks(range(0, L * H, H))
    ax_occ.set_yticklabels([f"layer {i}" for i in range(L)], fontsize=7)
    ax_occ.set_xlabel("position")
    ax_occ.set_title(f"all {L} layers × {H} heads\nprompt (blue), generated (red)", fontsize=9)
    for i in range(1, L):
        ax_occ.axhline(i * H - 0.5, color="white", lw=1.5)

    h["bars"] = ax_att.bar(np.arange(M), np.zeros(M))
    ax_att.set_xlim(-0.5, M - 0.5)
    h["att_title"] = ax_att.set_title("", fontsize=9)
    ax_att.set_ylabel("attention weight")
    h["suptitle"] = fig.suptitle("", fontsize=10, y=1.03)
    fig.course_handles = h
    return update_cache_view(fig, view)


def update_cache_view(fig, view: dict):
    """Show another step, layer, head or K/V in a figure that :func:`draw_cache_view` drew."""
    S, M, P = view["seq_len"], view["max_len"], view["prompt_len"]
    h = fig.course_handles
    ax_rows, ax_att = h["rows"].axes, h["bars"][0].axes
    canvas = np.full((M, view["rows"].shape[1]), np.nan)
    canvas[:S] = view["rows"]
    lim = np.nanmax(np.abs(view["rows"])) or 1.0
    h["rows"].set_data(canvas)
    h["rows"].set_clim(-lim, lim)
    h["rows_title"].set_text(f"cached {view['which'].upper()} rows, layer {view['layer']} head {view['head']}\n"
                             f"{S} of {M} positions filled")
    k = tick_step(S, 20)                                    # every k-th token, 8 pt
    ax_rows.set_yticks(range(0, S, k), list(view["labels"])[:S:k], fontsize=8)

    occ = np.zeros(h["occ"].get_array().shape)
    occ[:, :P] = 1
    occ[:, P:S] = 2
    h["occ"].set_data(occ)

    for i, bar in enumerate(h["bars"]):
        bar.set_height(float(view["attn"][i]) if i < S else 0.0)
        bar.set_color("#7fa7d6" if i < P else "#d6604d")
    ax_att.set_ylim(0, min(1.0, 1.15 * float(np.max(view["attn"]))))
    h["att_title"].set_text(f"query '{view['query']}' (position {S - 1}) against the {S} cached keys\n"
                            f"→ next token '{view['next_token']}'")
    k = tick_step(S, 28)
    ax_att.set_xticks(range(0, S, k), list(view["labels"])[:S:k], rotation=90, fontsize=8)
    same = "=" if view["bytes_formula"] == view["bytes_allocated"] else "≠"
    h["suptitle"].set_text(f"step {view['step']} ({'prefill' if view['step'] == 0 else 'decode'}): KV cache "
                           f"formula {view['bytes_formula']:,} B {same} allocated {view['bytes_allocated']:,} B")
    return fig


def plot_cache_bytes(steps, formula, allocated, ax=None, title=None):
    """Cache bytes after each step: the formula as a line, the allocation as dots on it."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
    else:
        fig = ax.figure
    ax.plot(steps, np.asarray(formula) / 1024, color="black", label="kv_cache_bytes formula")
    ax.plot(steps, np.asarray(allocated) / 1024, "o", ms=3, color="tab:red", label="KVCache.nbytes()")
    ax.set_xlabel("step (0 = prefill)")
    ax.set_ylabel("KiB")
    ax.set_title(title or "KV cache grows by the same bytes every step", fontsize=10)
    ax.legend(fontsize=8)
    return fig
