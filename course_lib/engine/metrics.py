"""What a step and a request cost: FLOPs, bytes, seconds, MFU, MBU, TTFT, TPOT.

The counts follow COURSE_PLAN.md's performance method, exactly (no fudge factors):

* FLOPs of a step = ``2 * N * tokens`` (N = non-embedding parameters: every new token goes
  through every weight matrix once, a multiply and an add per weight)
  + attention: per layer and sequence, ``4 * D * (keys seen, summed over its new queries)``
  (``q.k`` and ``weights @ v``, 2 FLOPs per multiply-add each); a full prompt of T tokens sees
  ``T(T+1)/2`` keys in all, about ``2 * T^2 * D`` per layer
  + LM head: ``2 * D * V`` per row that needs logits.
* bytes of a step = weights read once (``N`` plus ``V * D`` for the LM head when any row needs
  logits) + the K and V each sequence reads: ``2 * n_layer * D`` elements per key it sees.
* MFU = FLOPs / seconds / peak FLOP/s; MBU = bytes / seconds / peak bandwidth, with the
  peaks measured on the machine (benchmarks/bench_engine.py).

Introduced in notebooks/11_inside_an_engine.ipynb; the roofline in notebooks/10.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import GPTConfig
from ..model import parameter_shapes
from .sequence import Sequence


def non_embedding_params(config: GPTConfig) -> int:
    """N of the FLOP formula: every stored parameter except ``wte`` and ``wpe``."""
    total = 0
    for name, shape in parameter_shapes(config).items():
        if name not in ("transformer.wte.weight", "transformer.wpe.weight"):
            n = 1
            for s in shape:
                n *= s
            total += n
    return total


def attention_keys_seen(query_len: int, context_len: int) -> int:
    """Sum over the new queries of the keys each sees: queries sit at the last ``query_len``
    of ``context_len`` positions, query at position p sees p + 1 keys."""
    return query_len * context_len - query_len * (query_len - 1) // 2


def step_flops(config: GPTConfig, query_lens: list[int], context_lens: list[int], num_logit_rows: int,
               n_params: int | None = None) -> int:
    """``n_params`` (= :func:`non_embedding_params`) may be passed in to skip recounting it."""
    D, L, V = config.n_embd, config.n_layer, config.vocab_size
    N = non_embedding_params(config) if n_params is None else n_params
    tokens = sum(query_lens)
    attn = sum(4 * L * D * attention_keys_seen(q, c) for q, c in zip(query_lens, context_lens))
    return 2 * N * tokens + attn + 2 * D * V * num_logit_rows


def step_bytes(config: GPTConfig, context_lens: list[int], num_logit_rows: int, bytes_per_element: int,
               n_params: int | None = None) -> int:
    D, L, V = config.n_embd, config.n_layer, config.vocab_size
    N = non_embedding_params(config) if n_params is None else n_params
    weights = N + (V * D if num_logit_rows else 0)
    kv = sum(2 * L * D * c for c in context_lens)
    return (weights + kv) * bytes_per_element


@dataclass
class StepRecord:
    step: int
    num_seqs: int
    num_prefill_tokens: int       # tokens of sequences with more than one new token
    num_decode_tokens: int
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

    def __post_init__(self):
        self.n_params = non_embedding_params(self.config)

    def add(self, query_lens: list[int], context_lens: list[int], num_logit_rows: int, seconds: float) -> StepRecord:
        flops = step_flops(self.config, query_lens, context_lens, num_logit_rows, self.n_params)
        nbytes = step_bytes(self.config, context_lens, num_logit_rows, self.bytes_per_element, self.n_params)
        rec = StepRecord(
            step=len(self.records), num_seqs=len(query_lens),
            num_prefill_tokens=sum(q for q in query_lens if q > 1),
            num_decode_tokens=sum(1 for q in query_lens if q == 1),
            num_logit_rows=num_logit_rows, flops=flops, bytes=nbytes, seconds=seconds,
            mfu=flops / seconds / self.peak_flops if self.peak_flops and seconds > 0 else None,
            mbu=nbytes / seconds / self.peak_bandwidth if self.peak_bandwidth and seconds > 0 else None)
        self.records.append(rec)
        return rec

    def totals(self) -> dict:
        secs = sum(r.seconds for r in self.records)
        flops = sum(r.flops for r in self.records)
        nbytes = sum(r.bytes for r in self.records)
        return {"steps": len(self.records), "tokens": sum(r.num_tokens for r in self.records),
                "seconds": secs, "flops": flops, "bytes": nbytes,
                "tflops_per_s": flops / secs / 1e12 if secs else 0.0,
                "gbytes_per_s": nbytes / secs / 1e9 if secs else 0.0}


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


def request_metrics(seq: Sequence) -> RequestMetrics:
    times = seq.token_times
    itl = [b - a for a, b in zip(times, times[1:])]
    return RequestMetrics(
        num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
        num_cached_tokens=seq.num_cached_prompt_tokens, num_preemptions=seq.num_preemptions,
        ttft=times[0] - seq.arrival_time if times else float("nan"),
        tpot=sum(itl) / len(itl) if itl else None, itl=itl,
        latency=(seq.finish_time or times[-1]) - seq.arrival_time if times else float("nan"))


def throughput(seqs: list[Sequence]) -> dict:
    """Output tokens per second over the span from the first arrival to the last finish."""
    start = min(s.arrival_time for s in seqs)
    end = max(s.finish_time or s.token_times[-1] for s in seqs)
    out = sum(s.num_output_tokens for s in seqs)
    return {"output_tokens": out, "seconds": end - start,
            "output_tokens_per_s": out / (end - start) if end > start else float("inf")}
