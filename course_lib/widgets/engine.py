"""Serve a workload through the real engine and scrub through it: the logic behind notebook 11's widgets.

:func:`record_serving` feeds requests to ``llm.engine`` at given steps (``add_request`` between
``step()`` calls, the way requests reach a server) and keeps the engine's snapshots, the tokens
and their times. :class:`BlockExplorer` is a step slider over such a record, drawing the paged
pool and the timeline (:class:`course_lib.viz.engine.PoolFigure`). :func:`chunked_prefill_runs`
measures one long prompt arriving while others decode, at several token budgets;
:class:`BudgetExplorer` is a slider over those budgets. Tests call every function without a browser.
Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import ipywidgets as widgets
import matplotlib.pyplot as plt

from ..errors import ConfigError, InputError
from ..viz.engine import PoolFigure, draw_budget_tradeoff, draw_timeline, pool_summary, request_timeline
from .common import Explorer


@dataclass
class Request:
    """One request of a workload: it reaches the engine before step ``arrival`` of the run."""

    arrival: int                 # steps of the run done before it is added
    prompt_ids: list[int]
    params: object               # course_lib.engine.SamplingParams
    label: str


@dataclass
class ServingRecord:
    snapshots: list                      # the run's StepSnapshots
    records: list                        # the run's ledger StepRecords
    block_size: int
    labels: dict[str, str]               # request id -> label (in the order the requests were given)
    arrivals: dict[str, int]             # request id -> engine step at which it was added
    max_lens: dict[str, int]             # request id -> most tokens it can hold: prompt + max_tokens - 1
    prompts: dict[str, list[int]]
    outputs: dict[str, list[int]] = field(default_factory=dict)       # request id -> generated ids
    arrival_times: dict[str, float] = field(default_factory=dict)     # time.perf_counter() at add_request
    token_times: dict[str, list[float]] = field(default_factory=dict)  # when each token came back
    seconds: float = 0.0                 # wall time of the whole run

    @property
    def n_steps(self) -> int:
        return len(self.snapshots)

    def rid(self, label: str) -> str:
        """The request id of a label."""
        for rid, lab in self.labels.items():
            if lab == label:
                return rid
        raise InputError(f"no request labelled {label!r}; labels: {list(self.labels.values())}")

    def ttft(self, label: str) -> float:
        rid = self.rid(label)
        return self.token_times[rid][0] - self.arrival_times[rid]

    def itl(self, label: str) -> list[float]:
        t = self.token_times[self.rid(label)]
        return [b - a for a, b in zip(t, t[1:])]


def record_serving(llm, requests: list[Request], clock=time.perf_counter) -> ServingRecord:
    """Run ``requests`` through ``llm.engine`` to the end, adding each before step ``arrival``.

    The engine must record snapshots (``LLM(..., snapshot=True)``) and be idle. Returns the
    snapshots and ledger records of this run only. Arrival and token times are read from
    ``clock`` (wall-clock seconds by default; ``time.process_time`` counts only this process's
    CPU seconds, which other busy programs on a CPU machine do not inflate).
    """
    if llm.snapshots is None:
        raise ConfigError("record_serving draws from the engine's snapshots: create it with LLM(..., snapshot=True)")
    if not requests:
        raise InputError("give at least one Request")
    for r in requests:
        if isinstance(r.arrival, bool) or not isinstance(r.arrival, int) or r.arrival < 0:
            raise InputError(f"request {r.label!r}: arrival must be a step count >= 0, got {r.arrival!r}")
    engine = llm.engine
    if engine.has_unfinished():
        raise InputError("the engine still has unfinished requests; finish them before recording a new run")
    n_snap, n_rec = len(llm.snapshots), len(llm.ledger.records)
    pending = sorted(requests, key=lambda r: r.arrival)
    rec = ServingRecord([], [], engine.block_manager.block_size, {}, {}, {}, {})
    by_seq: dict[int, str] = {}
    done, t0 = 0, time.perf_counter()
    next_step = llm.snapshots[-1].step + 1 if llm.snapshots else 0
    while pending or engine.has_unfinished():
        while pending and (pending[0].arrival <= done or not engine.has_unfinished()):
            r = pending.pop(0)
            seq = engine.add_request(r.prompt_ids, r.params)
            rid = seq.request_id
            by_seq[id(seq)] = rid
            rec.labels[rid], rec.arrivals[rid], rec.prompts[rid] = r.label, next_step, list(r.prompt_ids)
            rec.max_lens[rid] = len(r.prompt_ids) + r.params.max_tokens - 1
            rec.arrival_times[rid] = clock()
            rec.outputs[rid], rec.token_times[rid] = [], []
        out = engine.step()
        now = clock()
        for seq, token in out:
            rid = by_seq[id(seq)]
            rec.outputs[rid].append(token)
            rec.token_times[rid].append(now)
        done += 1
        next_step = llm.snapshots[-1].step + 1
    rec.seconds = time.perf_counter() - t0
    rec.snapshots = llm.snapshots[n_snap:]
    rec.records = llm.ledger.records[n_rec:]
    return rec


def _png(fig, dpi: int = 80) -> bytes:
    """PNG bytes of a figure that stays open (the widget keeps drawing on it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


class BlockExplorer(Explorer):
    """A step slider over a :class:`ServingRecord`: the pool's blocks and the timeline at that step."""

    def __init__(self, record: ServingRecord, title: str = ""):
        if not record.snapshots:
            raise InputError("the record has no steps")
        self.record = record
        self.figure = PoolFigure(record.snapshots, record.block_size, record.labels, record.arrivals, title=title)
        plt.close(self.figure.fig)            # drawn into the Image below, never shown twice
        self.step = widgets.IntSlider(value=0, min=0, max=record.n_steps - 1, description="step",
                                      continuous_update=False, layout=widgets.Layout(width="60%"))
        super().__init__([self.step])
        self.update()

    def compute(self) -> tuple[str, bytes]:
        view = self.figure.show(self.step.value)
        return pool_summary(view, self.record.labels), _png(self.figure.fig)


def build_block_widget(record: ServingRecord, title: str = "") -> BlockExplorer:
    return BlockExplorer(record, title)


# --------------------------------------------------------------------------- chunked prefill


def window_itl(record: ServingRecord, decoders: list[str], long_label: str) -> list[float]:
    """Gaps between the decoders' tokens that overlap the long prompt's wait for its first token."""
    rid = record.rid(long_label)
    t0, t1 = record.arrival_times[rid], record.token_times[rid][0]
    gaps = []
    for lab in decoders:
        t = record.token_times[record.rid(lab)]
        gaps += [b - a for a, b in zip(t, t[1:]) if b > t0 and a < t1]
    return gaps


def chunked_prefill_runs(make_llm, decoders: list[Request], long_prompt: Request, budgets: list[int],
                         repeats: int = 3) -> dict[int, dict]:
    """Serve ``decoders`` with ``long_prompt`` arriving among them, once per token budget.

    ``make_llm(budget)`` returns an idle engine with ``max_num_batched_tokens=budget`` and snapshots
    on. Per budget, the best (smallest) of ``repeats`` runs: ``ttft`` of the long prompt and ``itl``,
    the longest gap between the decoders' tokens while it waited for its first token (the stall a big
    step causes; a median would hide it among the ordinary gaps of the same window); plus the
    last run's ``record``, ``outputs`` (label -> ids), ``prefill_steps`` (steps carrying a piece of
    the long prompt) and ``max_step_tokens`` (the most tokens any of those steps computed).
    """
    if not budgets:
        raise InputError("give at least one token budget")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InputError(f"repeats must be a positive integer, got {repeats!r}")
    labels = [d.label for d in decoders]
    runs = {}
    for budget in budgets:
        ttfts, itls = [], []
        for _ in range(repeats):
            llm = make_llm(budget)
            # a CPU engine computes on this process's threads: count its CPU seconds, so that another
            # busy program on the machine does not stretch the gaps; a GPU's work is wall-clock time
            clock = time.process_time if llm.engine.device.type == "cpu" else time.perf_counter
            rec = record_serving(llm, [*decoders, long_prompt], clock=clock)
            ttfts.append(rec.ttft(long_prompt.label))
            itls.append(max(window_itl(rec, labels, long_prompt.label)))
        rid = rec.rid(long_prompt.label)
        steps = [s for s in rec.snapshots if any(d["request_id"] == rid and d["kind"] == "prefill" for d in s.scheduled)]
        runs[budget] = {"ttft": min(ttfts), "itl": min(itls), "record": rec,
                        "outputs": {rec.labels[r]: ids for r, ids in rec.outputs.items()},
                        "prefill_steps": len(steps),
                        "max_step_tokens": max(sum(d["num_tokens"] for d in s.scheduled) for s in steps)}
    return runs


def budget_summary(runs: dict, budget: int) -> str:
    r = runs[budget]
    return (f"budget {budget} tokens/step: the long prompt is prefilled over {r['prefill_steps']} step(s) "
            f"(at most {r['max_step_tokens']} tokens in one), TTFT {r['ttft'] * 1e3:.1f} ms; "
            f"the decoders wait {r['itl'] * 1e3:.1f} ms for a token at most meanwhile (longest gap, best of repeats)")


def draw_budget_view(runs: dict, budget: int, title: str = ""):
    """The trade-off over all budgets (marker at ``budget``) beside that budget's timeline."""
    if budget not in runs:
        raise InputError(f"budget {budget} was not measured; measured: {sorted(runs)}")
    fig, (ax_t, ax_g) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [1, 1.4]})
    draw_budget_tradeoff(runs, ax_t, highlight=budget)
    rec = runs[budget]["record"]
    draw_timeline(request_timeline(rec.snapshots, rec.labels, rec.arrivals), ax_g, annotate=True,
                  title=f"timeline at budget {budget}")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


class BudgetExplorer(Explorer):
    """A slider over the measured token budgets."""

    def __init__(self, runs: dict, title: str = ""):
        if not runs:
            raise InputError("no runs: measure at least one budget with chunked_prefill_runs")
        self.runs, self.title = runs, title
        self.budget = widgets.SelectionSlider(options=sorted(runs), value=sorted(runs)[0], description="budget",
                                              continuous_update=False)
        super().__init__([self.budget])
        self.update()

    def compute(self) -> tuple[str, bytes]:
        fig = draw_budget_view(self.runs, self.budget.value, self.title)
        try:
            return budget_summary(self.runs, self.budget.value), _png(fig)
        finally:
            plt.close(fig)


# --------------------------------------------------------------------------- static batching


@dataclass
class StaticRun:
    outputs: list                 # RequestOutputs, in prompt order
    snapshots: list               # every group's steps, one after the other
    slots: list[int]              # per snapshot: the size of the group that step belongs to
    latencies: list[float]        # per request: from the start of the whole run to its last token
    seconds: float                # wall time of the whole run

    def idle_slots(self) -> int:
        """Slot-steps a group kept for requests that had already finished."""
        return sum(n - len(s.scheduled) for n, s in zip(self.slots, self.snapshots))


def static_batching(llm, prompts: list, params: list, group_size: int) -> StaticRun:
    """The baseline before continuous batching: fixed groups of ``group_size`` requests, one
    ``llm.generate`` per group, so a group holds its slots until its longest member is done and the
    next group waits for it. ``llm`` must record snapshots."""
    if llm.snapshots is None:
        raise ConfigError("static_batching counts steps from the snapshots: create the engine with LLM(..., snapshot=True)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise InputError(f"group_size must be a positive integer, got {group_size!r}")
    if len(prompts) != len(params):
        raise InputError(f"{len(prompts)} prompts but {len(params)} sampling params; give one each")
    n0 = len(llm.snapshots)
    outputs, latencies, slots = [], [], []
    t0 = time.perf_counter()
    for g in range(0, len(prompts), group_size):
        start, k = time.perf_counter(), len(llm.snapshots)
        outs = llm.generate(prompts[g:g + group_size], params[g:g + group_size])
        outputs += outs
        latencies += [start - t0 + o.metrics.latency for o in outs]
        slots += [len(outs)] * (len(llm.snapshots) - k)
    return StaticRun(outputs, llm.snapshots[n0:], slots, latencies, time.perf_counter() - t0)
