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
    """Three panels for one step: cached rows, occupancy per layer × head, attention row."""
    S, M, P = view["seq_len"], view["max_len"], view["prompt_len"]
    L, H = view["n_layer"], view["n_head"]
    if fig is None:
        fig = plt.figure(figsize=(10, 3.8))
    gs = fig.add_gridspec(1, 3, width_ratios=[1.1, 0.9, 1.4], wspace=0.4)
    ax_rows, ax_occ, ax_att = (fig.add_subplot(gs[0, i]) for i in range(3))

    canvas = np.full((M, view["rows"].shape[1]), np.nan)
    canvas[:S] = view["rows"]
    lim = np.nanmax(np.abs(view["rows"])) or 1.0
    ax_rows.imshow(canvas, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax_rows.axhline(P - 0.5, color="black", lw=0.8, ls="--")
    ax_rows.set_title(f"cached {view['which'].upper()} rows, layer {view['layer']} head {view['head']}\n"
                      f"{S} of {M} positions filled", fontsize=9)
    ax_rows.set_xlabel("head dim")
    ax_rows.set_ylabel("position (dashed: end of prompt)")
    k = tick_step(S, 20)                                    # every k-th token, 8 pt
    ax_rows.set_yticks(range(0, S, k))
    ax_rows.set_yticklabels(list(view["labels"])[:S:k], fontsize=8)

    occ = np.zeros((L * H, M))
    occ[:, :P] = 1
    occ[:, P:S] = 2
    ax_occ.imshow(occ, aspect="auto", cmap=plt.matplotlib.colors.ListedColormap(["#eeeeee", "#7fa7d6", "#d6604d"]),
                  vmin=0, vmax=2, interpolation="nearest")
    ax_occ.set_yticks(range(0, L * H, H))
    ax_occ.set_yticklabels([f"layer {i}" for i in range(L)], fontsize=7)
    ax_occ.set_xlabel("position")
    ax_occ.set_title(f"all {L} layers × {H} heads\nprompt (blue), generated (red)", fontsize=9)
    for i in range(1, L):
        ax_occ.axhline(i * H - 0.5, color="white", lw=1.5)

    x = np.arange(S)
    colors = ["#7fa7d6" if i < P else "#d6604d" for i in range(S)]
    ax_att.bar(x, view["attn"], color=colors)
    ax_att.set_xlim(-0.5, M - 0.5)
    ax_att.set_ylim(0, min(1.0, 1.15 * float(np.max(view["attn"]))))
    ax_att.set_title(f"query '{view['query']}' (position {S - 1}) against the {S} cached keys\n"
                     f"→ next token '{view['next_token']}'", fontsize=9)
    ax_att.set_ylabel("attention weight")
    k = tick_step(S, 28)
    ax_att.set_xticks(x[::k])
    ax_att.set_xticklabels(list(view["labels"])[:S:k], rotation=90, fontsize=8)
    same = "=" if view["bytes_formula"] == view["bytes_allocated"] else "≠"
    fig.suptitle(f"step {view['step']} ({'prefill' if view['step'] == 0 else 'decode'}): KV cache formula "
                 f"{view['bytes_formula']:,} B {same} allocated {view['bytes_allocated']:,} B", fontsize=10, y=1.03)
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
