"""Where the serving workload's time goes (GPT-2 124M shape, random weights, bf16; needs CUDA).

    python benchmarks/probe_serving.py OUT.json [--requests 64] [--device cpu]   # cpu: the ledger part only

bench_engine's serving row (all requests at once, prompt and output lengths uniform in
[100, 1024], EOS ignored) is one number. This probe runs that workload on an engine built as the
bench builds it and splits the number up:

* the steps the ledger recorded, grouped by kind (steps holding prompt tokens, decode-only steps)
  and by how many requests a decode step ran: steps, seconds, ms a step, output tokens;
* the whole call's wall time beside the ledger's sum (what no step accounts for);
* one more run under torch.profiler (CUDA activity only): GPU busy time (the union of kernel
  intervals) against the wall, kernel time per class (profile_steps.CLASSES) and the top kernels.

Fresh prompts every run (no prefix hits), the same lengths.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from course_lib.engine import LLM, SamplingParams  # noqa: E402
from course_lib.engine import benchmark as B  # noqa: E402
from profile_steps import busy_time, kernel_class  # noqa: E402

#: decode steps grouped by the requests they ran
BATCH_GROUPS = [(1, 1), (2, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 256)]


def ledger_summary(records) -> dict:
    def group(recs):
        secs = sum(r.seconds for r in recs)
        return {"steps": len(recs), "seconds": secs, "ms_per_step": secs / len(recs) * 1e3 if recs else None,
                "decode_tokens": sum(r.num_decode_tokens for r in recs),
                "prefill_tokens": sum(r.num_prefill_tokens for r in recs)}
    out = {"with_prompt_tokens": group([r for r in records if r.num_prefill_tokens]),
           "decode_only": group([r for r in records if not r.num_prefill_tokens])}
    for lo, hi in BATCH_GROUPS:
        recs = [r for r in records if not r.num_prefill_tokens and lo <= r.num_decode_tokens <= hi]
        if recs:
            out[f"decode_{lo}-{hi}"] = group(recs)
    out["ledger_seconds"] = sum(r.seconds for r in records)
    return out


def run(llm, prompts, outs, sync) -> tuple[float, list]:
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in outs]
    n0 = len(llm.ledger.records)
    sync()
    t = time.perf_counter()
    res = llm.generate(prompts, params)
    sync()
    secs = time.perf_counter() - t
    assert sum(len(o.token_ids) for o in res) == sum(outs)
    return secs, llm.ledger.records[n0:]


def main() -> int:
    out_path = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else None
    count = int(sys.argv[sys.argv.index("--requests") + 1]) if "--requests" in sys.argv else 64
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = B.random_gpt("gpt2", device, torch.bfloat16 if device == "cuda" else torch.float32)
    cfg = model.config
    hi = min(1024, cfg.n_positions // 2)                      # bench_engine's bound
    llm = LLM(model, block_size=16, max_num_batched_tokens=8192, max_num_seqs=256,
              gpu_memory_fraction=0.85 if device == "cuda" else None, enable_prefix_caching=True)
    _, outs = B.serving_workload(count, 100, hi, cfg.vocab_size, seed=0)
    rounds = [B.serving_workload(count, 100, hi, cfg.vocab_size, seed=0)[0]]
    rounds += [[B.random_prompts(1, len(p), cfg.vocab_size, seed=50_000 * (r + 1) + i)[0] for i, p in enumerate(rounds[0])]
               for r in range(3)]
    result = {"requests": count, "output_tokens": sum(outs), "prompt_tokens": sum(len(p) for p in rounds[0])}
    run(llm, rounds[3], outs, sync)                                   # warm-up: every bucket captured
    secs, recs = run(llm, rounds[0], outs, sync)
    result["tokens_per_s"] = sum(outs) / secs
    result["wall_s"] = secs
    result["ledger"] = ledger_summary(recs)
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "wall_s")}), flush=True)
    for k, v in result["ledger"].items():
        print(k, json.dumps(v), flush=True)

    if device != "cuda":
        llm.shutdown()
        return 0
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        psecs, _ = run(llm, rounds[1], outs, sync)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memset" not in e.name.lower()]
    a = min(k.time_range.start for k in kernels)
    b = max(k.time_range.end for k in kernels)
    per_name: dict[str, float] = {}
    for k in kernels:
        per_name[k.name] = per_name.get(k.name, 0.0) + (k.time_range.end - k.time_range.start)
    per_class: dict[str, float] = {}
    for n, us in per_name.items():
        per_class[kernel_class(n)] = per_class.get(kernel_class(n), 0.0) + us
    result["profiled"] = {"wall_s": psecs, "kernels": len(kernels), "first_to_last_kernel_s": (b - a) / 1e6,
                          "busy_s": busy_time([(k.time_range.start, k.time_range.end) for k in kernels], a, b) / 1e6,
                          "class_s": {c: us / 1e6 for c, us in sorted(per_class.items(), key=lambda kv: -kv[1])},
                          "top_kernels_s": {n: us / 1e6 for n, us in sorted(per_name.items(), key=lambda kv: -kv[1])[:15]}}
    print("profiled", json.dumps(result["profiled"], indent=1), flush=True)
    llm.shutdown()
    result["device"] = torch.cuda.get_device_name()
    result["versions"] = {"torch": torch.__version__}
    if out_path:
        Path(out_path).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
