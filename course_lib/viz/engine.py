"""Pictures of the engine's glass box: the paged KV pool, the scheduler's timeline, the ledger.

Everything here reads what ``LLM(..., snapshot=True)`` records (a list of
:class:`course_lib.engine.snapshot.StepSnapshot`) or the per-step ledger; nothing reaches into
the engine's internals. Three kinds of functions:

* data from snapshots: :func:`request_timeline` (who was waiting, prefilling, decoding, stalled or
  preempted at every step), :func:`pool_view` (which request holds which block and slot after a
  step), :func:`memory_series` (slots held by the paged pool vs a contiguous cache per request);
* figures: :class:`PoolFigure` (the pool grid above the timeline, updated in place for the widget),
  :func:`draw_pool`, :func:`draw_timeline`, :func:`draw_memory`, :func:`draw_ledger`,
  :func:`draw_budget_tradeoff`;
* :func:`request_colours`: one colour per request, shared by every picture.

Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap, to_rgb
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from ..errors import InputError

#: the states of a request at one step, in the timeline's colour order
STATES = ("waiting", "prefill", "recompute", "decode", "stalled", "preempted")
STATE_COLOURS = {"waiting": "#d9d9d9", "prefill": "#1f77b4", "recompute": "#9467bd", "decode": "#2ca02c",
                 "stalled": "#ffbf00", "preempted": "#d62728"}
ABSENT = -1          # not arrived yet, or finished
FREE_RGB = (1.0, 1.0, 1.0)
NULL_RGB = (0.35, 0.35, 0.35)
#: request colours (blocks, row labels): chosen apart from the state colours above
REQUEST_PALETTE = ("#17becf", "#e377c2", "#8c564b", "#bcbd22", "#ff7f0e", "#008080", "#6b6ecf", "#c51b7d",
                   "#7f3b08", "#1b9e77", "#fdb462", "#80b1d3")


def _check_snapshots(snapshots) -> list:
    if snapshots is None:
        raise InputError("no snapshots: create the engine with LLM(..., snapshot=True)")
    snapshots = list(snapshots)
    if not snapshots:
        raise InputError("the snapshot list is empty: run at least one engine step first")
    return snapshots


def request_colours(request_ids) -> dict[str, tuple]:
    """One RGB colour per request id, in order; none of them is a timeline state's colour."""
    return {rid: to_rgb(REQUEST_PALETTE[i % len(REQUEST_PALETTE)]) for i, rid in enumerate(request_ids)}


# --------------------------------------------------------------------------- timeline


@dataclass
class Timeline:
    request_ids: list[str]     # rows
    labels: list[str]          # one label per row
    steps: list[int]           # engine step numbers (columns)
    states: np.ndarray         # (R, S) index into STATES, or ABSENT
    tokens: np.ndarray         # (R, S) tokens computed for the request in that step (0 if none)

    def count(self, state: str) -> int:
        """Request-steps spent in ``state`` over the whole timeline."""
        return int((self.states == STATES.index(state)).sum())

    def row(self, request_id: str) -> list[str]:
        """The states of one request, step by step ('' where absent)."""
        r = self.request_ids.index(request_id)
        return [STATES[s] if s >= 0 else "" for s in self.states[r]]


def request_timeline(snapshots, labels: dict[str, str] | None = None,
                     arrivals: dict[str, int] | None = None) -> Timeline:
    """Rows = requests, columns = steps, from the snapshots of one run.

    ``labels`` maps request ids to names (and fixes the row order); ``arrivals`` maps a request id
    to the engine step at which it was added (default: the first snapshot's step, i.e. every
    request was there from the start). A request is *waiting* from its arrival until it is
    scheduled (and again after a preemption), *prefill* while prompt tokens are computed (a chunk
    or the whole prompt; *recompute* when it had been preempted before), *decode* for one sampled
    token, *stalled* while it holds blocks but got no tokens this step (the budget ran out), and
    *preempted* in the step its blocks were taken away.
    """
    snapshots = _check_snapshots(snapshots)
    order: list[str] = list(labels) if labels else []
    for snap in snapshots:
        for s in snap.scheduled:
            if s["request_id"] not in order:
                order.append(s["request_id"])
    steps = [snap.step for snap in snapshots]
    first = steps[0]
    arrive = {rid: (arrivals or {}).get(rid, first) for rid in order}
    R, S = len(order), len(steps)
    states = np.full((R, S), ABSENT, dtype=int)
    tokens = np.zeros((R, S), dtype=int)
    row = {rid: i for i, rid in enumerate(order)}
    done: set[str] = set()
    was_preempted: set[str] = set()
    for j, snap in enumerate(snapshots):
        scheduled = {s["request_id"]: s for s in snap.scheduled}
        for rid in order:
            if rid in done or snap.step < arrive[rid]:
                continue
            i = row[rid]
            if rid in scheduled:
                s = scheduled[rid]
                tokens[i, j] = s["num_tokens"]
                if s["kind"] == "decode":
                    states[i, j] = STATES.index("decode")
                else:
                    states[i, j] = STATES.index("recompute" if rid in was_preempted else "prefill")
            elif rid in snap.preempted:
                states[i, j] = STATES.index("preempted")
                was_preempted.add(rid)
            elif rid in snap.block_tables:
                states[i, j] = STATES.index("stalled")
            else:
                states[i, j] = STATES.index("waiting")
        done.update(snap.finished)
    names = [(labels or {}).get(rid, f"req {rid}") for rid in order]
    return Timeline(order, names, steps, states, tokens)


def draw_timeline(timeline: Timeline, ax=None, title: str = "", cursor: int | None = None,
                  colours: dict | None = None, annotate: bool = True):
    """A Gantt chart of ``timeline``; ``cursor`` (a column index) draws a marker line.

    Row labels are coloured like the request's blocks in the pool picture (``colours``).
    Prefill cells show how many tokens were computed when ``annotate`` and the cells are wide enough.
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(8.6, 0.35 * len(timeline.request_ids) + 1.4))
    cmap = ListedColormap([STATE_COLOURS[s] for s in STATES])
    data = np.ma.masked_less(timeline.states, 0)
    R, S = timeline.states.shape
    ax.imshow(data, cmap=cmap, vmin=-0.5, vmax=len(STATES) - 0.5, aspect="auto", interpolation="nearest",
              extent=(-0.5, S - 0.5, R - 0.5, -0.5))
    ax.set_yticks(range(R), timeline.labels, fontsize=8)
    if colours:
        for lab, rid in zip(ax.get_yticklabels(), timeline.request_ids):
            if rid in colours:
                lab.set_color(colours[rid])
                lab.set_fontweight("bold")
    stride = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 10**9) if S / s <= 16)
    ax.set_xticks(range(0, S, stride), [str(j) for j in range(0, S, stride)], fontsize=8)
    ax.set_xlabel("step of this run", fontsize=9)
    ax.set_xlim(-0.5, S - 0.5)
    ax.set_ylim(R - 0.5, -0.5)
    ax.set_xticks(np.arange(-0.5, S, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, R, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    if annotate and S <= 60:
        pre = (STATES.index("prefill"), STATES.index("recompute"))
        for i in range(R):
            for j in range(S):
                if timeline.states[i, j] in pre and timeline.tokens[i, j] > 1:
                    ax.text(j, i, str(timeline.tokens[i, j]), ha="center", va="center", fontsize=7, color="white")
    handles = [Patch(color=STATE_COLOURS[s], label=s) for s in STATES]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    if cursor is not None:
        ax.axvline(cursor, color="black", linewidth=1.5)
    return ax.figure


# --------------------------------------------------------------------------- the paged pool


@dataclass
class PoolView:
    step: int                              # engine step number
    index: int                             # position in the snapshot list
    num_blocks: int                        # usable blocks (ids 1..num_blocks; 0 is the null block)
    block_size: int
    block_tables: dict[str, list[int]]     # after the step
    cached_tokens: dict[str, int]          # tokens with K/V in the pool, per request, after the step
    owners: list[list[str]]                # per block id 0..num_blocks: requests holding it
    filled: np.ndarray                     # (num_blocks + 1, block_size) bool: the slot holds K/V
    num_free_blocks: int                   # the engine's own count (free list, incl. cached-but-free)
    scheduled: list[dict]
    prefix_hits: dict[str, int]
    preempted: list[str]
    finished: list[str]

    @property
    def held_blocks(self) -> int:
        """Distinct blocks in some block table (a shared block counts once)."""
        return sum(1 for o in self.owners[1:] if o)

    @property
    def shared_blocks(self) -> int:
        return sum(1 for o in self.owners[1:] if len(o) > 1)

    @property
    def filled_slots(self) -> int:
        return int(self.filled[1:].sum())

    @property
    def empty_reserved_slots(self) -> int:
        """Slots in held blocks that hold nothing yet: the unused tail of each last block."""
        return self.held_blocks * self.block_size - self.filled_slots


def _cached_tokens_after(snapshots, index: int) -> dict[str, int]:
    """Tokens with K/V per request after snapshot ``index``: start + new tokens of its last step, for
    the requests that hold blocks after it (a preempted or finished request holds none)."""
    cached: dict[str, int] = {}
    for snap in snapshots[:index + 1]:
        for s in snap.scheduled:
            cached[s["request_id"]] = s["start"] + s["num_tokens"]
    return {rid: n for rid, n in cached.items() if rid in snapshots[index].block_tables}


def pool_view(snapshots, index: int, block_size: int) -> PoolView:
    """The pool after step ``snapshots[index]``: owners of every block and which slots hold K/V."""
    snapshots = _check_snapshots(snapshots)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(snapshots):
        raise InputError(f"index must be in 0..{len(snapshots) - 1} (one per recorded step), got {index!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise InputError(f"block_size must be a positive integer (the engine's block_size), got {block_size!r}")
    snap = snapshots[index]
    n = snap.num_blocks
    owners: list[list[str]] = [[] for _ in range(n + 1)]
    filled = np.zeros((n + 1, block_size), dtype=bool)
    cached = _cached_tokens_after(snapshots, index)
    for rid, table in snap.block_tables.items():
        for b in table:
            if not 0 < b <= n:
                raise InputError(f"block {b} of request {rid} is outside the pool of {n} blocks: "
                                 "is block_size the engine's?")
            owners[b].append(rid)
        for t in range(cached.get(rid, 0)):
            filled[table[t // block_size], t % block_size] = True
    return PoolView(snap.step, index, n, block_size, {k: list(v) for k, v in snap.block_tables.items()},
                    cached, owners, filled, snap.num_free_blocks, list(snap.scheduled), dict(snap.prefix_hits),
                    list(snap.preempted), list(snap.finished))


def pool_rgb(view: PoolView, colours: dict, blocks_per_row: int) -> np.ndarray:
    """The pool as an image: (rows, blocks_per_row * block_size, 3). Filled slots in the owner's colour,
    reserved-but-empty slots in a pale tint of it, free blocks white, the null block 0 dark grey."""
    n, bs = view.num_blocks + 1, view.block_size
    rows = -(-n // blocks_per_row)
    img = np.ones((rows, blocks_per_row * bs, 3))
    for b in range(rows * blocks_per_row):
        r, c = divmod(b, blocks_per_row)
        cells = img[r, c * bs:(c + 1) * bs]
        if b >= n:
            cells[:] = 0.93                        # past the pool's end
        elif b == 0:
            cells[:] = NULL_RGB
        elif view.owners[b]:
            base = np.array(colours.get(view.owners[b][0], (0.5, 0.5, 0.5)))
            pale = 1 - 0.3 * (1 - base)
            cells[:] = np.where(view.filled[b][:, None], base, pale)
        else:
            cells[:] = FREE_RGB
    return img


def pool_summary(view: PoolView, labels: dict[str, str] | None = None) -> str:
    """One line: the step, blocks held/free, and each request's block table."""
    name = (lambda rid: (labels or {}).get(rid, f"req {rid}"))
    parts = [f"step {view.index}: {view.held_blocks} of {view.num_blocks} blocks held "
             f"({view.shared_blocks} shared), {view.empty_reserved_slots} empty slots in them"]
    events = []
    if view.prefix_hits:
        events.append("prefix hit " + ", ".join(f"{name(r)} {n} tokens" for r, n in view.prefix_hits.items()))
    if view.preempted:
        events.append("preempted " + ", ".join(map(name, view.preempted)))
    if view.finished:
        events.append("finished " + ", ".join(map(name, view.finished)))
    if events:
        parts.append("; ".join(events))
    tables = " · ".join(f"{name(r)} {t}" for r, t in view.block_tables.items()) or "no block tables"
    return " | ".join(parts) + "\nblock tables: " + tables


class PoolFigure:
    """The paged pool (top) above the request timeline with a cursor at the step (bottom).

    Built once; :meth:`show` updates the artists in place (the widget calls it on every slider move).
    """

    def __init__(self, snapshots, block_size: int, labels: dict[str, str] | None = None,
                 arrivals: dict[str, int] | None = None, blocks_per_row: int = 8, title: str = ""):
        self.snapshots = _check_snapshots(snapshots)
        self.block_size = block_size
        self.timeline = request_timeline(self.snapshots, labels, arrivals)
        self.labels = dict(zip(self.timeline.request_ids, self.timeline.labels))
        self.colours = request_colours(self.timeline.request_ids)
        self.blocks_per_row = blocks_per_row
        first = pool_view(self.snapshots, 0, block_size)
        n, bs = first.num_blocks + 1, block_size
        rows = -(-n // blocks_per_row)
        R = len(self.timeline.request_ids)
        self.fig, (self.ax_pool, self.ax_time) = plt.subplots(
            2, 1, figsize=(8.6, 1.0 + 0.55 * rows + 0.3 * R + 1.6),
            gridspec_kw={"height_ratios": [0.55 * rows + 0.4, 0.3 * R + 0.6]})
        self.image = self.ax_pool.imshow(pool_rgb(first, self.colours, blocks_per_row), aspect="auto",
                                         interpolation="nearest", extent=(0, blocks_per_row * bs, rows, 0))
        ax = self.ax_pool
        for c in range(1, blocks_per_row):
            ax.axvline(c * bs, color="black", linewidth=1.2)
        for r in range(1, rows):
            ax.axhline(r, color="black", linewidth=1.2)
        ax.set_xticks([c * bs + bs / 2 for c in range(blocks_per_row)], [f"+{c}" for c in range(blocks_per_row)], fontsize=8)
        ax.set_yticks([r + 0.5 for r in range(rows)], [f"blocks {r * blocks_per_row}-" for r in range(rows)], fontsize=8)
        ax.tick_params(length=0)
        self.block_text, self.share_marks = [], []
        for b in range(n):
            r, c = divmod(b, blocks_per_row)
            self.block_text.append(ax.text(c * bs + 0.6, r + 0.3, "", fontsize=7, va="center", ha="left"))
            mark = Rectangle((c * bs, r), bs, 1, fill=False, hatch="///", edgecolor="black", linewidth=0, visible=False)
            ax.add_patch(mark)
            self.share_marks.append(mark)
        handles = [Patch(color=self.colours[rid], label=self.labels[rid]) for rid in self.timeline.request_ids]
        handles += [Patch(facecolor="white", edgecolor="black", label="free"),
                    Patch(facecolor="white", edgecolor="black", hatch="///", label="shared"),
                    Patch(color=NULL_RGB, label="null block 0")]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        self.pool_title = ax.set_title("", fontsize=9)
        draw_timeline(self.timeline, self.ax_time, colours=self.colours, cursor=0)
        self.cursor = self.ax_time.lines[-1]
        self.fig.suptitle(title or f"the paged KV pool ({first.num_blocks} blocks of {bs} slots) and the scheduler's timeline",
                          fontsize=10)
        self.fig.tight_layout()
        self.view = first
        self.show(0)

    def show(self, index: int) -> PoolView:
        """Draw the pool after step ``index`` (a position in the snapshot list); returns the view."""
        view = pool_view(self.snapshots, index, self.block_size)
        self.image.set_data(pool_rgb(view, self.colours, self.blocks_per_row))
        for b, text in enumerate(self.block_text):
            own = view.owners[b] if b < len(view.owners) else []
            text.set_text("null" if b == 0 else f"{b}" + (f" ×{len(own)}" if len(own) > 1 else ""))
            text.set_color("white" if b == 0 else "black")
            self.share_marks[b].set_visible(len(own) > 1)
        self.pool_title.set_text(f"after step {view.index}: {view.held_blocks} blocks held, "
                                 f"{view.num_free_blocks} on the free list; pale = reserved, still empty")
        self.cursor.set_xdata([index, index])
        self.view = view
        self.fig.canvas.draw_idle()
        return view


def draw_pool(snapshots, index: int, block_size: int, labels=None, arrivals=None, title: str = ""):
    """The static figure of the pool after one step (the widget's picture at that step)."""
    pf = PoolFigure(snapshots, block_size, labels, arrivals, title=title)
    pf.show(index)
    return pf.fig


# --------------------------------------------------------------------------- memory


def memory_series(snapshots, block_size: int, max_lens: dict[str, int]) -> dict[str, np.ndarray]:
    """Per step, in token slots: what the paged pool holds vs what contiguous caches would reserve.

    ``held``: slots of the distinct blocks in the block tables; ``filled``: slots holding K/V;
    ``contiguous``: a cache per running request sized for its maximum length ``max_lens[id]``
    (prompt + max_tokens - 1), the way one ``[B, H, T, Dh]`` tensor per request must be allocated.
    """
    snapshots = _check_snapshots(snapshots)
    held, filled, contiguous = [], [], []
    for i, snap in enumerate(snapshots):
        v = pool_view(snapshots, i, block_size)
        missing = [r for r in snap.block_tables if r not in max_lens]
        if missing:
            raise InputError(f"max_lens has no maximum length for request(s) {missing}")
        held.append(v.held_blocks * block_size)
        filled.append(v.filled_slots)
        contiguous.append(sum(max_lens[r] for r in snap.block_tables))
    return {"steps": np.arange(len(snapshots)), "held": np.array(held),
            "filled": np.array(filled), "contiguous": np.array(contiguous)}


def draw_memory(series: dict, bytes_per_slot: int, ax=None, title: str = "", pool_slots: int | None = None):
    """KV memory over the run: contiguous reservation, blocks held, slots actually filled (KiB);
    ``pool_slots`` draws the pool's size as a dashed line."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.8, 3.4))
    k = bytes_per_slot / 1024
    x = series["steps"]
    if pool_slots is not None:
        ax.axhline(pool_slots * k, color="black", linestyle="--", linewidth=1, label="the engine's whole pool")
    ax.step(x, series["contiguous"] * k, where="mid", color="tab:red", label="contiguous: each request at its maximum length")
    ax.step(x, series["held"] * k, where="mid", color="tab:blue", label="paged: blocks held")
    ax.step(x, series["filled"] * k, where="mid", color="tab:green", label="slots holding K/V")
    ax.fill_between(x, series["filled"] * k, series["held"] * k, step="mid", color="tab:blue", alpha=0.2,
                    label="empty tails of last blocks")
    ax.set_xlabel("step of this run", fontsize=9)
    ax.set_ylabel("KV cache (KiB)", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return ax.figure


# --------------------------------------------------------------------------- ledger and budget


def draw_ledger(records, title: str = ""):
    """Four panels over the steps: tokens (prefill/decode), FLOPs and bytes, time, MFU and MBU."""
    if not records:
        raise InputError("the ledger is empty: run at least one engine step first")
    x = np.arange(len(records))
    pre = np.array([r.num_prefill_tokens for r in records])
    dec = np.array([r.num_decode_tokens for r in records])
    fig, axes = plt.subplots(4, 1, figsize=(9, 7.2), sharex=True)
    axes[0].bar(x, pre, color=STATE_COLOURS["prefill"], label="prefill tokens")
    axes[0].bar(x, dec, bottom=pre, color=STATE_COLOURS["decode"], label="decode tokens")
    axes[0].set_ylabel("tokens", fontsize=9)
    axes[1].plot(x, [r.flops / 1e6 for r in records], color="tab:purple", label="MFLOP")
    axes[1].plot(x, [r.bytes / 1e6 for r in records], color="tab:orange", label="MB read")
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axes[1].yaxis.set_minor_formatter(NullFormatter())
    axes[1].set_ylabel("per step", fontsize=9)
    axes[2].plot(x, [r.seconds * 1e3 for r in records], color="black", label="wall time")
    axes[2].set_ylabel("ms", fontsize=9)
    axes[2].set_ylim(bottom=0)
    if all(r.mfu is not None for r in records):
        axes[3].plot(x, [100 * r.mfu for r in records], color="tab:purple", label="MFU")
        axes[3].plot(x, [100 * r.mbu for r in records], color="tab:orange", label="MBU")
        axes[3].set_ylabel("% of peak", fontsize=9)
        axes[3].set_ylim(bottom=0)
    else:
        axes[3].text(0.5, 0.5, "no peaks given: LLM(peak_flops=..., peak_bandwidth=...)", ha="center",
                     transform=axes[3].transAxes, fontsize=9)
    axes[3].set_xlabel("step of this run", fontsize=9)
    axes[3].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def draw_budget_tradeoff(runs: dict, ax=None, highlight: int | None = None, title: str = ""):
    """Measured over token budgets: the long prompt's TTFT and the decoders' longest inter-token
    latency while it was prefilled. ``runs[budget]`` has ``ttft`` and ``itl`` in seconds."""
    if not runs:
        raise InputError("no runs to draw: measure at least one token budget")
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.4))
    budgets = sorted(runs)
    ax.plot(budgets, [runs[b]["ttft"] * 1e3 for b in budgets], "o-", color="tab:blue", label="long prompt: TTFT")
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets], fontsize=8)
    ax.set_xlabel("token budget per step (max_num_batched_tokens)", fontsize=9)
    ax.set_ylabel("TTFT of the long prompt (ms)", color="tab:blue", fontsize=9)
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(budgets, [runs[b]["itl"] * 1e3 for b in budgets], "s--", color="tab:red", label="decoders: ITL")
    ax2.set_ylabel("decoders' inter-token latency (ms)", color="tab:red", fontsize=9)
    ax2.set_ylim(bottom=0)
    ax.tick_params(labelsize=8)
    ax2.tick_params(labelsize=8)
    if highlight is not None and highlight in runs:
        ax.axvline(highlight, color="grey", linewidth=1, linestyle=":")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return ax.figure
