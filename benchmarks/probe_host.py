"""The engine's host work alone: the forward pass replaced by a stub that returns fixed logits.

    python benchmarks/probe_host.py [--repeats 7] [--profile] [--out DIR]
    python benchmarks/probe_host.py --smoke --out /tmp/p     # seconds (tests)

On a GPU the device runs the step graph while the host does everything else: request checks,
scheduling, block allocation and prefix-cache naming, the flat batch, sampling's bookkeeping,
learning the tokens. When that host work takes longer than the replay, the host sets the row's
speed (GPT-2 124M prefill of 8 × 1024 tokens: a 3.3 ms replay inside a ~6.8 ms ``generate``
call on the H200, benchmarks/NOTES.md). This probe times that work on any machine, GPU or not:
the engine is built on the CPU for the GPT-2 124M shape (block size 16, prefix caching on), and
``runner.execute`` returns a (rows, vocab) logits tensor without running the model, so what is
timed is the host path of the bench rows:

* ``prefill``: ``generate`` of B fresh prompts of T tokens, one new token each (bench_engine's
  prefill row; fresh prompts every repeat, so no prefix hits);
* ``decode``: ms per decode step of B running requests (context 512), with decode bursts as on
  CUDA (``--decode-burst``, 8: a call to ``engine.step()`` then runs up to 8 steps);
* ``serving``: bench_engine's serving workload, and the output tok/s the host alone allows.

Reports the median and min of ``--repeats`` and, with ``--profile``, the top functions by
cumulative time of one call (cProfile). Writes ``<date>_host_<cpu>.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib import perf  # noqa: E402
from course_lib.config import GPTConfig  # noqa: E402
from course_lib.engine import LLM, SamplingParams  # noqa: E402
from course_lib.engine import benchmark as B  # noqa: E402
from course_lib.engine.sampler import HostSample  # noqa: E402
from course_lib.model import GPT  # noqa: E402


#: GPT-2's vocabulary and context with a narrow, shallow body: the host's work depends on token and
#: block counts, not on the width, and the KV pool of the serving workload (~40k blocks) then fits
HOST_SHAPE = dict(vocab_size=50257, n_positions=2048, n_embd=64, n_layer=2, n_head=2)


def stubbed_llm(decode_burst: int, max_num_batched_tokens: int = 8192, num_kv_blocks: int = 40_000) -> LLM:
    """An LLM on the CPU whose forward returns constant logits (the host path only), with
    bench_engine's settings: block size 16, 8,192 tokens and 256 requests a step, prefix caching."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**HOST_SHAPE)).eval()
    llm = LLM(model, device="cpu", dtype=torch.float32, max_num_batched_tokens=max_num_batched_tokens,
              max_num_seqs=256, num_kv_blocks=num_kv_blocks, decode_burst=decode_burst)
    # two columns, not the vocabulary: the argmax over 50,257 logits is device work on a GPU, not host
    # work, and on this CPU it would take longer than everything timed here; greedy picks token 0
    logits = torch.zeros(max_num_batched_tokens, 2)
    logits[:, 0] = 1.0

    def execute(flat):
        MARKS.setdefault("launch", time.perf_counter())      # the first launch of the timed call
        return logits[:len(flat.logits_indices)], None       # (R, V), no greedy tokens: sampled here

    llm.engine.runner.execute = execute
    return llm


#: times of one call: its first launch, the start and end of its first token read (HostSample.read)
MARKS: dict[str, float] = {}
_read = HostSample.read


def _marked_read(self):
    MARKS.setdefault("read", time.perf_counter())
    try:
        return _read(self)
    finally:
        MARKS.setdefault("read_end", time.perf_counter())


HostSample.read = _marked_read


def time_prefill(llm, batch: int, T: int, repeats: int, profile: bool) -> dict:
    """ms of one ``generate`` call, and its parts on a GPU's critical path: before the forward's
    launch (``before_launch``), from the launch to the token read (``overlappable``: on a GPU it
    runs beside the device, so it costs nothing while shorter than the replay) and after the read."""
    rounds = [B.random_prompts(batch, T, llm.config.vocab_size, seed=1000 + r) for r in range(repeats + 1)]
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    times, parts = [], []
    for r, prompts in enumerate(rounds):
        MARKS.clear()
        t = time.perf_counter()
        llm.generate(prompts, params)
        end = time.perf_counter()
        if r:
            times.append(end - t)
            parts.append((MARKS["launch"] - t, MARKS["read"] - MARKS["launch"], end - MARKS["read_end"]))
    out = {"workload": "prefill", "batch": batch, "prompt_len": T, "ms": [x * 1e3 for x in times]}
    for name, values in zip(("before_launch", "overlappable", "after_read"), zip(*parts)):
        out[name + "_ms"] = statistics.median(values) * 1e3
    if profile:
        prompts = B.random_prompts(batch, T, llm.config.vocab_size, seed=99)
        out["profile"] = profiled(lambda: llm.generate(prompts, params))
    return out


def time_decode(llm, batch: int, context: int, calls: int, repeats: int, profile: bool) -> dict:
    """ms of host work per decode step (a burst's steps counted one by one), B requests at ``context``."""
    engine = llm.engine
    prompts = B.random_prompts(batch, context, llm.config.vocab_size, seed=7)
    limit = llm.config.n_positions - context
    seqs = [engine.add_request(p, SamplingParams(max_tokens=limit, ignore_eos=True)) for p in prompts]
    while any(s.num_output_tokens == 0 for s in seqs):        # the prefills, and the first decode steps
        engine.step()
    times = []
    for _ in range(repeats):
        n0, t = engine.num_steps, time.perf_counter()
        for _ in range(calls):
            engine.step()
        times.append((time.perf_counter() - t) / (engine.num_steps - n0))
    assert all(not s.is_finished for s in seqs), "the decode rows ran out of context: fewer calls"
    out = {"workload": "decode", "batch": batch, "context": context, "ms": [x * 1e3 for x in times]}
    if profile:
        out["profile"] = profiled(lambda: [engine.step() for _ in range(calls)])
    for s in seqs:
        engine.abort(s)
    return out


def time_serving(llm, count: int, profile: bool) -> dict:
    """bench_engine's serving workload (``count`` requests, prompt and output lengths uniform in
    [100, 1024], all arriving at once, EOS ignored): host seconds and the output tok/s it allows."""
    prompts, outs = B.serving_workload(count, 100, 1024, llm.config.vocab_size, seed=0)
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in outs]
    run = (lambda: llm.generate(prompts, params))
    n0, t = llm.engine.num_steps, time.perf_counter()
    produced = sum(len(o.token_ids) for o in run())
    secs = time.perf_counter() - t
    assert produced == sum(outs), "the engine produced fewer tokens than asked"
    out = {"workload": "serving", "batch": count, "ms": [secs * 1e3], "output_tokens": produced,
           "host_bound_tokens_per_s": produced / secs, "steps": llm.engine.num_steps - n0}
    if profile:
        out["profile"] = profiled(run)
    return out


def profiled(fn, top: int = 30, sort: str = "tottime") -> list[str]:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats(sort).print_stats(top)
    return [line for line in buf.getvalue().splitlines() if line.strip()]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--decode-burst", type=int, default=8, help="8: the engine's default on CUDA")
    p.add_argument("--serving-requests", type=int, default=256)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="2 repeats, 16 serving requests, a small pool (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.repeats, args.serving_requests = 2, 16
    torch.set_num_threads(1)
    llm = stubbed_llm(args.decode_burst, num_kv_blocks=4_000 if args.smoke else 40_000)
    rows = [time_prefill(llm, 8, 1024, args.repeats, args.profile),
            time_prefill(llm, 1, 1024, args.repeats, args.profile),
            time_decode(llm, 1, 512, 16, args.repeats, args.profile),
            time_decode(llm, 32, 512, 16, args.repeats, args.profile),
            time_serving(llm, args.serving_requests, args.profile)]
    for r in rows:
        r["median_ms"], r["min_ms"] = statistics.median(r["ms"]), min(r["ms"])
        extra = f"  ({r['host_bound_tokens_per_s']:,.0f} output tok/s)" if r["workload"] == "serving" else ""
        if r["workload"] == "prefill":
            extra = (f"  before launch {r['before_launch_ms']:.3f}, overlappable {r['overlappable_ms']:.3f}, "
                     f"after the read {r['after_read_ms']:.3f}")
        print(f"{r['workload']:8s} B{r['batch']:<3d} median {r['median_ms']:.3f} ms  min {r['min_ms']:.3f} ms{extra}")
        for line in r.get("profile", []):
            print("   ", line)
    result = {"date": dt.date.today().isoformat(), "cpu": perf.device_name("cpu"), "machine": platform.machine(),
              "python": platform.python_version(), "torch": torch.__version__,
              "decode_burst": args.decode_burst, "rows": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{result['date']}_host_{platform.machine()}{'_smoke' if args.smoke else ''}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print("wrote", path)
    return result


if __name__ == "__main__":
    main()
