"""Measuring the engine: ceilings, prefill, decode and a serving workload.

Shared by ``python -m course_lib.engine bench`` (the engine alone) and
``benchmarks/bench_engine.py`` (the engine beside HF transformers). Every measurement returns
tokens per second together with the FLOPs and bytes the ledger counted, so MFU and MBU sit
next to it (gpt-fast's habit: show the distance to the hardware limit).
"""

from __future__ import annotations

import random
import time

import torch

from .. import perf
from ..config import GPTConfig
from ..model import GPT
from .metrics import step_cost
from .sequence import SamplingParams

#: model shapes with random weights; n_positions 2048 as in the issue's benchmark
SHAPES = {
    "gpt2": dict(vocab_size=50257, n_positions=2048, n_embd=768, n_layer=12, n_head=12),
    "gpt2-xl": dict(vocab_size=50257, n_positions=2048, n_embd=1600, n_layer=48, n_head=25),
    "smoke": dict(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=2),
}


def random_gpt(shape: str, device, dtype, seed: int = 0) -> GPT:
    """A GPT of a named shape with GPT-2's random initialisation, made directly on ``device``."""
    config = GPTConfig(**SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT(config)
    return model.to(dtype).eval()


def ceilings(device, smoke: bool = False) -> dict:
    """Measured peaks (course_lib.perf): matmul (bf16 8192^3 on a GPU) in TFLOP/s, device copy
    (read + write; 2 GiB on a GPU) in GB/s."""
    c = perf.measure_ceilings(device, matmul_n=512 if smoke else None, copy_bytes=(32 << 20) if smoke else None,
                              repeats=3 if smoke else 10)
    return {"matmul_bf16_tflops": c.peak_flops / 1e12, "copy_gbps": c.bandwidth / 1e9}


def random_prompts(count: int, lengths, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``count`` prompts of random ids; ``lengths`` is an int or a (low, high) range, inclusive."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = lengths if isinstance(lengths, int) else rng.randint(*lengths)
        out.append([rng.randrange(vocab_size) for _ in range(n)])
    return out


def serving_workload(count: int, low: int, high: int, vocab_size: int, seed: int = 0):
    """Prompts and output lengths, both uniform in [low, high]: (prompts, output_lens)."""
    rng = random.Random(seed + 1)
    prompts = random_prompts(count, (low, high), vocab_size, seed)
    return prompts, [rng.randint(low, high) for _ in range(count)]


def _rates(config, flops, nbytes, seconds, peaks) -> dict:
    return {"mfu": flops / seconds / (peaks["matmul_bf16_tflops"] * 1e12) if peaks else None,
            "mbu": nbytes / seconds / (peaks["copy_gbps"] * 1e9) if peaks else None}


def engine_prefill(llm, batch: int, prompt_len: int, peaks=None, seed: int = 0, repeats: int = 3) -> dict:
    """Prefill tok/s: ``batch`` prompts of ``prompt_len`` tokens, one new token each.

    Timed around the whole ``generate`` call (request checks and output included), best of ``repeats``.
    Every round's prompts are made before the first (fresh ones each round: no prefix hits), so no
    Python work leaves the device idle between rounds — the compiled peer runs its repeats back to
    back too."""
    best = None
    rounds = [random_prompts(batch, prompt_len, llm.config.vocab_size, seed + r) for r in range(repeats + 1)]
    for r, prompts in enumerate(rounds):            # the first round warms up
        n0 = len(llm.ledger.records)
        perf.synchronize(llm.device)
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True))
        perf.synchronize(llm.device)
        secs = time.perf_counter() - t
        recs = llm.ledger.records[n0:]
        if r and (best is None or secs < best[0]):
            best = (secs, sum(x.flops for x in recs), sum(x.bytes for x in recs))
    secs, flops, nbytes = best
    return {"tokens_per_s": batch * prompt_len / secs, "seconds": secs, **_rates(llm.config, flops, nbytes, secs, peaks)}


def engine_decode(llm, batch: int, context: int, steps: int = 64, peaks=None, seed: int = 0) -> dict:
    """Decode tok/s at about ``context`` tokens: prompts of ``context``, then ``steps`` decode steps."""
    for warm in (True, False):
        prompts = random_prompts(batch, context, llm.config.vocab_size, seed + 100 + warm)
        n0 = len(llm.ledger.records)
        llm.generate(prompts, SamplingParams(max_tokens=(8 if warm else steps) + 1, ignore_eos=True))
    recs = [x for x in llm.ledger.records[n0:] if x.num_prefill_tokens == 0 and x.num_decode_tokens == batch]
    secs = sum(x.seconds for x in recs)
    tokens = sum(x.num_decode_tokens for x in recs)
    return {"tokens_per_s": tokens / secs, "seconds": secs,
            **_rates(llm.config, sum(x.flops for x in recs), sum(x.bytes for x in recs), secs, peaks)}


def engine_decode_in_turns(engines: dict, batch: int, context: int, steps: int, rounds: int = 3) -> dict:
    """Decode tok/s of several engines on one device, measured in turns (round ``r`` on seed ``r``
    for every engine), so that the device's drift falls on all of them alike: an A/B's numbers,
    ``{name: [tok/s of each round]}``, rounded to 0.1."""
    got = {name: [] for name in engines}
    for r in range(rounds):
        for name, llm in engines.items():
            got[name].append(round(engine_decode(llm, batch, context, steps, seed=r)["tokens_per_s"], 1))
    return got


def engine_serving(llm, prompts, output_lens) -> dict:
    """Output tok/s of a whole workload, all requests arriving at once, EOS ignored. The warm-up
    runs on other prompts, so the timed ones find nothing in the prefix cache."""
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in output_lens]
    warm = [random_prompts(1, len(p), llm.config.vocab_size, seed=10_007 + i)[0] for i, p in enumerate(prompts[:4])]
    llm.generate(warm, params[:4])
    perf.synchronize(llm.device)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    secs = time.perf_counter() - t
    produced = sum(len(o.token_ids) for o in outs)
    assert produced == sum(output_lens), "the engine produced fewer tokens than asked"
    return {"tokens_per_s": produced / secs, "seconds": secs, "mfu": None, "mbu": None}


def formula_rates(config: GPTConfig, workload: str, batch: int, prompt_len: int, context: int,
                  seconds: float, steps: int, bytes_per_element: int, peaks) -> dict:
    """MFU/MBU of a peer's run from the same formulas (prefill: one step; decode: ``steps`` steps)."""
    if not peaks:
        return {"mfu": None, "mbu": None}
    if workload == "prefill":
        flops, nbytes = step_cost(config, [prompt_len] * batch, [prompt_len] * batch, batch, bytes_per_element)
    else:
        mid = context + steps // 2
        flops, nbytes = (steps * x for x in step_cost(config, [1] * batch, [mid] * batch, batch, bytes_per_element))
    return _rates(config, flops, nbytes, seconds, peaks)
