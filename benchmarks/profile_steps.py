"""Where one engine step's time goes, measured: kernels per step, GPU time per kernel class, GPU idle.

    python benchmarks/profile_steps.py --out DIR          # GPT-2 124M and XL shapes, random weights, bf16

For each model: prefill steps (B1 and B8 × 1024 tokens) and decode steps (B1 and B32, context 512),
profiled with torch.profiler (CUDA activity) around ``engine.step()`` calls marked with
``record_function``; a decode call runs a burst of ``decode_burst`` forward steps, so every number
is a sum over the profiled calls divided by the forward steps they issued. Per forward step it
reports the wall time, the number of CUDA kernels, the GPU time of each kernel class (matmuls,
attention, LayerNorm, element-wise, sampling, copies, other) and the GPU's idle time: the wall
time less the union of the kernels' busy intervals (a graph replay's kernels can overlap; each
instant is counted once), and the kernels that took the most GPU time.
With programmatic dependent launch a kernel's interval includes its wait for the one ahead, so
the per-class times overlap and add up to more than the busy time; ``COURSE_PDL=0`` gives
class times that do not (``--tag nopdl`` names that run's files). Writes
``<date>_<device>_step_profile[_<tag>].json`` and ``.md``. Needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib.engine import LLM, SamplingParams  # noqa: E402
from course_lib.engine import benchmark as B  # noqa: E402

#: kernel name patterns → class, first match wins
CLASSES = [
    ("attention", r"unified|attention|attn|flash"),
    ("layernorm", r"layer_?norm|layernorm"),
    ("matmul", r"gemm|gemv|cutlass|sm90|xmma|cublas|splitk|nvjet|matmul"),
    ("sampling", r"argmax|arg_max|topk|softmax|multinomial|reduce"),
    ("copy / cache write", r"copy|memcpy|cache_write|scatter|index_put|gather|index"),
    ("element-wise", r"elementwise|vectorized|gelu|add|mul|fill|where|tanh"),
]


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, pattern in CLASSES:
        if re.search(pattern, low):
            return cls
    return "other"


def busy_time(intervals, a: float, b: float) -> float:
    """The union of ``intervals`` clipped to ``[a, b]`` (same units)."""
    busy, reach = 0.0, a
    for s, e in sorted((max(s, a), min(e, b)) for s, e in intervals if e > a and s < b):
        if e > reach:
            busy += e - max(s, reach)
            reach = e
    return busy


def profile_steps(llm, prompts, max_tokens: int, skip: int, steps: int) -> list[dict]:
    """Add ``prompts``, run ``skip`` steps unprofiled, then profile ``steps`` calls of
    ``engine.step()``; one dict a call, with the forward steps it issued."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for p in prompts:
        llm.engine.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    for _ in range(skip):
        llm.engine.step()
    torch.cuda.synchronize()
    forward_steps = []              # forward steps each call issued: a decode burst issues several
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            before = llm.engine.num_steps
            with record_function(f"engine_step_{i}"):
                llm.engine.step()
            forward_steps.append(llm.engine.num_steps - before)
        torch.cuda.synchronize()
    while llm.engine.has_unfinished():
        llm.engine.step()
    events = prof.events()
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    kernels = [e for e in events if e.device_type == cuda and not e.name.startswith("engine_step_")
               and "memset" not in e.name.lower() and "memcpy" not in e.name.lower()]
    # a step's window runs from its call's start to the next call's start (with asynchronous
    # scheduling a call returns before its kernels have run); the last one to the last kernel's end
    starts = sorted(e.time_range.start for e in events if e.name.startswith("engine_step_") and e.device_type == cpu)
    end = max([k.time_range.end for k in kernels] + [starts[-1]])
    windows = list(zip(starts, starts[1:] + [end]))
    rows = []
    for (a, b), issued in zip(windows, forward_steps):
        inside = [k for k in kernels if a <= k.time_range.start < b]
        per_name: dict[str, float] = {}
        for k in inside:
            per_name[k.name] = per_name.get(k.name, 0.0) + (k.time_range.end - k.time_range.start)
        per_class: dict[str, float] = {}
        for n, us in per_name.items():
            c = kernel_class(n)
            per_class[c] = per_class.get(c, 0.0) + us
        busy = busy_time([(k.time_range.start, k.time_range.end) for k in inside], a, b)
        rows.append({"forward_steps": issued, "wall_us": b - a, "kernels": len(inside), "busy_us": busy,
                     "idle_us": (b - a) - busy, "class_us": per_class, "name_us": per_name})
    return rows


def summarise(rows: list[dict]) -> dict:
    """Every number per forward step: the sum over the profiled calls over the forward steps they
    issued. A call that runs a decode burst issues several steps, and the calls between bursts
    issue none (with asynchronous scheduling, a burst's kernels may also start in the next call's
    window): only the sums mean a step. One step a call (prefill): that call's numbers."""
    n = sum(r["forward_steps"] for r in rows)
    if n == 0:
        raise RuntimeError("the profiled calls issued no forward step: give the case more tokens")
    per = lambda key: sum(r[key] for r in rows) / n             # noqa: E731
    per_in = lambda key, k: sum(r[key].get(k, 0.0) for r in rows) / n   # noqa: E731
    classes = sorted({c for r in rows for c in r["class_us"]})
    names = {k for r in rows for k in r["name_us"]}
    return {"calls": len(rows), "forward_steps": n, "wall_us": per("wall_us"), "kernels": per("kernels"),
            "busy_us": per("busy_us"), "idle_us": per("idle_us"),
            "class_us": {c: per_in("class_us", c) for c in classes},
            "top_kernels_us": dict(sorted(((k, per_in("name_us", k)) for k in names), key=lambda kv: -kv[1])[:12])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="gpt2,gpt2-xl")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--steps", type=int, default=8, help="decode steps profiled per case")
    p.add_argument("--tag", default="", help="suffix of the output files' names (e.g. nopdl)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("profile_steps needs a CUDA GPU")
        return 1
    device, dtype = torch.device("cuda"), torch.bfloat16
    name = torch.cuda.get_device_name(device)
    from course_lib.engine.pdl import pdl_enabled
    result = {"device": name, "torch": torch.__version__, "date": dt.date.today().isoformat(),
              "pdl": pdl_enabled(device), "cases": []}
    lines = [f"Engine steps on {name} (torch {torch.__version__}, bf16, random weights, CUDA graphs on, "
             f"PDL {'on' if result['pdl'] else 'off'}): "
             "per forward step, over the profiled calls (a decode burst is several steps in one call)", "",
             "| model | step | wall µs | kernels | GPU busy µs | GPU idle µs | matmul | attention | layernorm | "
             "element-wise | copy / cache write | sampling | other |", "|" + "---|" * 13]
    for shape in a.models.split(","):
        model = B.random_gpt(shape, device, dtype, seed=0)
        V = model.config.vocab_size
        llm = LLM(model, device=device, dtype=dtype, max_num_batched_tokens=8192, max_num_seqs=64,
                  num_kv_blocks=4096)             # bench_engine's step budget: 8 x 1024 tokens in one step
        cfg = llm.engine.config
        llm.generate(B.random_prompts(4, (32, 64), V, seed=1), SamplingParams(max_tokens=4, ignore_eos=True))   # warm
        cases = [("prefill B1×1024", B.random_prompts(1, (1024, 1024), V, seed=2), 2, 0, 1),
                 ("prefill B8×1024", B.random_prompts(8, (1024, 1024), V, seed=5), 2, 0, 1),
                 # enough tokens that every profiled call runs a whole burst (decode_burst steps)
                 ("decode B1 ctx 512", B.random_prompts(1, (512, 512), V, seed=3),
                  (a.steps + 4) * cfg.decode_burst, 2, a.steps),
                 ("decode B32 ctx 512", B.random_prompts(32, (512, 512), V, seed=4),
                  (a.steps + 4) * cfg.decode_burst, 2, a.steps)]
        for label, prompts, max_tokens, skip, steps in cases:
            s = summarise(profile_steps(llm, prompts, max_tokens, skip, steps))
            s.update(model=shape, step=label, fused_kernels=cfg.fused_kernels, async_scheduling=cfg.async_scheduling,
                     max_kv_splits=cfg.max_kv_splits)
            result["cases"].append(s)
            c = s["class_us"]
            lines.append(f"| {shape} | {label} | {s['wall_us']:.0f} | {s['kernels']:.0f} | {s['busy_us']:.0f} | "
                         f"{s['idle_us']:.0f} | " + " | ".join(f"{c.get(k, 0.0):.0f}" for k in
                         ("matmul", "attention", "layernorm", "element-wise", "copy / cache write", "sampling",
                          "other")) + " |")
            print(lines[-1], flush=True)
        llm.shutdown()
        del llm, model
        torch.cuda.empty_cache()
    lines += ["", "The kernels with the most GPU time a forward step (µs):", ""]
    for s in result["cases"]:
        top = "; ".join(f"{n[:60]} {us:.0f}" for n, us in list(s["top_kernels_us"].items())[:8])
        lines.append(f"* {s['model']} {s['step']}: {top}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    stem = out / f"{result['date']}_{slug}_step_profile{'_' + a.tag if a.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
