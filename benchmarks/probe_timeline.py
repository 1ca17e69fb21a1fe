"""The critical path of a decode step on one GPU, kernel by kernel: when each kernel of a replayed
step *ends*, relative to the one before it.

    PYTHONPATH=$PWD python3 benchmarks/probe_timeline.py --out $OUT     # H200: ~1 minute

With programmatic dependent launch a kernel starts early and waits, so its own interval says little;
its end, less the end of the kernel ahead, is what it adds to the step. torch.profiler's trace of a
few decode bursts (GPT-2 XL and 124M, batch 1 and 32, context 512) gives every kernel's start and
end on the device; per kernel name this reports the median of (end - end of the kernel before) and
of its own duration, over the middle layers of the traced steps, and the kernels of one middle layer
in order. Writes ``probe_timeline.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_lib.engine import LLM, SamplingParams  # noqa: E402
from course_lib.engine import benchmark as B  # noqa: E402


def kernels_of(trace_path: Path) -> list[tuple[str, float, float]]:
    events = json.loads(trace_path.read_text())["traceEvents"]
    ks = [(e["name"][:60], float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
          if e.get("cat") == "kernel"]
    return sorted(ks, key=lambda k: k[2])            # by end time: the order the chain completes in


def trace_case(llm, batch: int, context: int, tmp: Path) -> dict:
    prompts = B.random_prompts(batch, context, llm.config.vocab_size, seed=5)
    llm.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True))          # warm
    for p in prompts:
        llm.engine.add_request(p, SamplingParams(max_tokens=64, ignore_eos=True))
    llm.engine.step()                                                                # the prefill
    for _ in range(2):
        llm.engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            llm.engine.step()
        torch.cuda.synchronize()
    while llm.engine.has_unfinished():
        llm.engine.step()
    path = tmp / f"trace_{batch}.json"
    prof.export_chrome_trace(str(path))
    ks = kernels_of(path)
    deltas, durs = defaultdict(list), defaultdict(list)
    n = len(ks)
    for i in range(1, n):                             # skip the first and last fifth: step edges
        if n // 5 <= i < n - n // 5:
            name, start, end = ks[i]
            deltas[name].append(end - ks[i - 1][2])
            durs[name].append(end - start)
    mid = n // 2
    layer = [{"kernel": k[0], "start_us": round(k[1] - ks[mid - 8][2], 2), "end_us": round(k[2] - ks[mid - 8][2], 2)}
             for k in ks[mid - 8: mid + 8]]
    return {"kernels_traced": n,
            "per_kernel": {name: {"count": len(v), "median_end_delta_us": round(statistics.median(v), 2),
                                  "median_duration_us": round(statistics.median(durs[name]), 2),
                                  "sum_end_delta_us": round(sum(v), 1)}
                           for name, v in sorted(deltas.items(), key=lambda kv: -sum(kv[1]))},
            "window": layer}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="gpt2-xl,gpt2")
    args = p.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.models.split(","):
            model = B.random_gpt(shape, "cuda", torch.bfloat16, seed=0)
            llm = LLM(model, device="cuda", dtype=torch.bfloat16, num_kv_blocks=2048, max_num_seqs=32,
                      max_num_batched_tokens=1024)
            for batch in (1, 32):
                case = {"model": shape, "batch": batch, **trace_case(llm, batch, 512, Path(tmp))}
                result["cases"].append(case)
                print(shape, batch, json.dumps(dict(list(case["per_kernel"].items())[:8])), flush=True)
                for w in case["window"]:
                    print("   ", w, flush=True)
            llm.shutdown()
            del llm, model
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_timeline.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
