"""Where a prefill ``generate`` call's time goes on one GPU: the host before the replay, the replay
on the device, and what follows it, for the bench's prefill rows (B prompts of 1,024 tokens, one
new token each, fresh prompts every call).

    PYTHONPATH=$PWD python3 benchmarks/probe_ttft.py --out $OUT     # GPU (not run yet: written 2026-12-06)

The engine is built as bench_engine.py builds it, with a smaller KV pool. For each call the step graph's ``replay`` is
wrapped: host clocks at the call's start, just before and just after the replay is issued, and at
the call's return; CUDA events at the call's start and around the replay. Then the same graph is
replayed alone, back to back, on the last call's buffers (its steady-state device time). Writes
``probe_ttft.json``; prints one line a row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_lib.engine import LLM, SamplingParams  # noqa: E402
from course_lib.engine import benchmark as B  # noqa: E402


class TimedReplay:
    """Wraps a CUDA graph's ``replay`` with host clocks and CUDA events."""

    def __init__(self, graph):
        self.graph = graph
        self.marks = None

    def replay(self):
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        before.record()
        self.graph.replay()
        after.record()
        self.marks = (t0, time.perf_counter(), before, after)


def one_call(llm, prompts, timed: TimedReplay) -> dict:
    start = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    start.record()
    llm.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    total = time.perf_counter() - t
    t_issue, t_issued, before, after = timed.marks
    return {"total_ms": total * 1e3, "host_before_replay_ms": (t_issue - t) * 1e3,
            "replay_issue_ms": (t_issued - t_issue) * 1e3,
            "device_start_to_replay_ms": start.elapsed_time(before),
            "replay_device_ms": before.elapsed_time(after),
            "after_replay_ms": total * 1e3 - (t_issue - t) * 1e3 - before.elapsed_time(after)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="gpt2-xl,gpt2")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--calls", type=int, default=6)
    args = p.parse_args()
    rows = []
    for shape in args.models.split(","):
        model = B.random_gpt(shape, "cuda", torch.bfloat16, seed=0)
        llm = LLM(model, device="cuda", dtype=torch.bfloat16, block_size=16, max_num_batched_tokens=8192,
                  max_num_seqs=256, num_kv_blocks=1200, enable_prefix_caching=True)
        graphs = llm.engine.runner.step_graphs
        for batch in [int(b) for b in args.batches.split(",")]:
            N = next(n for n in sorted(graphs.graphs) if n >= batch * 1024)
            graph, logits = graphs.graphs[N]
            timed = TimedReplay(graph)
            graphs.graphs[N] = (timed, logits)
            calls = []
            for r in range(args.calls + 1):
                prompts = B.random_prompts(batch, 1024, model.config.vocab_size, seed=1000 * batch + r)
                c = one_call(llm, prompts, timed)
                if r:                                  # the first call warms up
                    calls.append(c)
            graphs.graphs[N] = (graph, logits)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(10):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            back_to_back = start.elapsed_time(end) / 10
            best = min(calls, key=lambda c: c["total_ms"])
            row = {"model": shape, "batch": batch, "bucket": N, "best_call": best,
                   "median": {k: statistics.median(c[k] for c in calls) for k in best},
                   "replay_back_to_back_ms": back_to_back}
            rows.append(row)
            print(shape, batch, {k: round(v, 3) for k, v in best.items()}, "back-to-back", round(back_to_back, 3),
                  flush=True)
        llm.shutdown()
        del llm, model
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_ttft.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
