"""What a step and a request cost: FLOPs, bytes, seconds, MFU, MBU, TTFT, TPOT.

The counting lives in one place, course_lib.perf (:func:`~course_lib.perf.batch_cost` and, without
its breakdown, :func:`~course_lib.perf.batch_totals`, from the same rates; the course's FLOP and byte
conventions, notebooks/10): per step, the weight products of every new token, causal attention
over the keys each query sees, and the LM head on the rows that sample. The ledger turns them
into rates against the machine's measured ceilings:

* MFU = FLOPs / seconds / peak FLOP/s;
* MBU = (weight bytes + KV bytes read) / seconds / peak bandwidth.

Introduced in notebooks/11_inside_an_engine.ipynb; the roofline in notebooks/10.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import GPTConfig
from ..perf import CostRates, batch_totals, cost_rates
from .sequence import Sequence


def step_cost(config: GPTConfig, query_lens, context_lens, num_logit_rows: int, bytes_per_element: int):
    """``(flops, bytes)`` of one engine step as the ledger counts them (bytes: weights + KV read):
    perf.batch_cost's totals, through the same perf.batch_totals the ledger calls every step."""
    return batch_totals(cost_rates(config, bytes_per_element), query_lens, context_lens, num_logit_rows)


@dataclass
class StepRecord:
    step: int
    num_seqs: int
    num_prefill_tokens: int       # tokens of prompts (or of a preempted request's recomputation)
    num_decode_tokens: int        # one per request whose new token was itself sampled
    num_logit_rows: int
    flops: int
    bytes: int
    seconds: float
    mfu: float | None = None
    mbu: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


@dataclass
class Ledger:
    """One :class:`StepRecord` per engine step."""

    config: GPTConfig
    bytes_per_element: int
    peak_flops: float | None = None          # FLOP/s, measured
    peak_bandwidth: float | None = None      # bytes/s, measured
    records: list[StepRecord] = field(default_factory=list)
    rates: CostRates = field(init=False, repr=False)   # cost_rates(config, bytes_per_element), made once

    def __post_init__(self):
        self.rates = cost_rates(self.config, self.bytes_per_element)

    def count(self, flat) -> StepRecord:
        """What one step of the flat batch ``flat`` (batch.py) computes, not yet timed (the engine
        counts a step when it issues it, while the device runs it, and times it once its tokens
        are read: :meth:`add`). :func:`step_cost`'s numbers, from rates made once: this runs in
        every step's host path (a batch-1 decode step's count: 22.7 us with batch_cost's breakdown,
        2.0 us now, on a 2-core CPU; benchmarks/NOTES.md)."""
        rows = len(flat.logits_indices)
        flops, nbytes = batch_totals(self.rates, flat.query_lens, flat.context_lens, rows)
        decodes = sum(1 for s in flat.seqs if s.is_decode)
        return StepRecord(step=-1, num_seqs=flat.num_seqs, num_prefill_tokens=flat.num_tokens - decodes,
                          num_decode_tokens=decodes, num_logit_rows=rows, flops=flops, bytes=nbytes, seconds=0.0)

    def add(self, rec: StepRecord, seconds: float) -> StepRecord:
        """Record a counted step (:meth:`count`) that took ``seconds``."""
        rec.step, rec.seconds = len(self.records), seconds
        rec.mfu = rec.flops / seconds / self.peak_flops if self.peak_flops and seconds > 0 else None
        rec.mbu = rec.bytes / seconds / self.peak_bandwidth if self.peak_bandwidth and seconds > 0 else None
        self.records.append(rec)
        return rec


@dataclass
class RequestMetrics:
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int       # prompt tokens reused from the prefix cache
    num_preemptions: int
    ttft: float                  # arrival → first output token (s)
    tpot: float | None           # mean time per output token after the first (s)
    itl: list[float]             # gaps between consecutive output tokens (s)
    latency: float               # arrival → finish (s)
    arrival_time: float          # time.perf_counter() stamps, for spans over many requests
    finish_time: float


def request_metrics(seq: Sequence) -> RequestMetrics:
    times = seq.token_times
    itl = [b - a for a, b in zip(times, times[1:])]
    return RequestMetrics(
        num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
        num_cached_tokens=seq.num_cached_prompt_tokens, num_preemptions=seq.num_preemptions,
        ttft=times[0] - seq.arrival_time if times else float("nan"),
        tpot=sum(itl) / len(itl) if itl else None, itl=itl,
        latency=(seq.finish_time or times[-1]) - seq.arrival_time if times else float("nan"),
        arrival_time=seq.arrival_time, finish_time=seq.finish_time or (times[-1] if times else seq.arrival_time))


def throughput(outputs) -> dict:
    """Output tokens per second of finished requests (RequestOutputs), from the first arrival to
    the last finish."""
    start = min(o.metrics.arrival_time for o in outputs)
    end = max(o.metrics.finish_time for o in outputs)
    out = sum(o.metrics.num_output_tokens for o in outputs)
    return {"output_tokens": out, "seconds": end - start,
            "output_tokens_per_s": out / (end - start) if end > start else float("inf")}
