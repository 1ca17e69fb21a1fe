"""The engine beside HF transformers on the learner's CPU, in one run.

Greedy generation, fp32, the same weights for every system, fresh random prompts each repeat
(no system gets prefix-cache hits the others cannot), timed around the whole call:

* ``tiny``: the shipped tiny model, 16 prompts x 60 tokens -> 32 new tokens;
* ``gpt2``: GPT-2 124M's shape with random weights (n_positions 1024), batch 1 and 8,
  64-token prompts -> 32 new tokens.

Systems: transformers' ``generate`` (attn_implementation="sdpa"), the reference
``course_lib.model.GPT.generate`` (its contiguous KV cache), and ``course_lib.engine.LLM`` with
default settings. Every repeat checks that the engine's greedy tokens equal transformers'.
Also measured in the same run: the CPU's matmul and copy ceilings (course_lib.perf), and the
cold start of ``LLM("tiny")`` in a fresh Python process.

Writes benchmarks/results/<date>_<cpu>.json (and .md), prints the table.

    python benchmarks/bench_cpu.py                 # about 3 minutes on one thread
    python benchmarks/bench_cpu.py --threads 2 --repeats 5
    python benchmarks/bench_cpu.py --smoke --out /tmp/b   # seconds (tests)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib import checkpoint, perf  # noqa: E402
from course_lib.config import GPTConfig  # noqa: E402
from course_lib.engine import LLM, SamplingParams  # noqa: E402
from course_lib.engine.benchmark import random_prompts  # noqa: E402

GPT2_124M = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
SMOKE = dict(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=2)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def hf_model(gpt, directory: Path):
    import transformers

    checkpoint.save(gpt, directory)
    return transformers.GPT2LMHeadModel.from_pretrained(directory, attn_implementation="sdpa").eval()


def time_hf(model, prompts, new_tokens):
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                             pad_token_id=0)
    return time.perf_counter() - t, out[:, ids.shape[1]:].tolist()


def time_reference(gpt, prompts, new_tokens):
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    out = gpt.generate(ids, new_tokens)
    return time.perf_counter() - t, out[:, ids.shape[1]:].tolist()


def time_engine(llm, prompts, new_tokens):
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t, [o.token_ids for o in outs]


def workload(name, gpt, llm, hf, batch, prompt_len, new_tokens, repeats, seed):
    """Best of ``repeats`` for each system, prompts fresh each repeat (one warm-up round first)."""
    systems = {"transformers": lambda p: time_hf(hf, p, new_tokens),
               "reference": lambda p: time_reference(gpt, p, new_tokens),
               "engine": lambda p: time_engine(llm, p, new_tokens)}
    times = {s: [] for s in systems}
    identical = True
    for r in range(repeats + 1):
        prompts = random_prompts(batch, prompt_len, gpt.config.vocab_size, seed=seed + r)
        tokens = {}
        for s, fn in systems.items():          # interleaved: a disturbance hits every system alike
            secs, tokens[s] = fn(prompts)
            if r:
                times[s].append(secs)
        identical &= tokens["engine"] == tokens["transformers"]
    rows = []
    for s, ts in times.items():
        rows.append({"model": name, "system": s, "batch": batch, "prompt_len": prompt_len,
                     "new_tokens": new_tokens, "seconds": ts, "best_s": min(ts),
                     "tokens_per_s": batch * new_tokens / min(ts)})
    base = min(times["transformers"])
    for row in rows:
        row["vs_transformers"] = base / row["best_s"]
    log(f"{name} B={batch}: " + ", ".join(f"{r['system']} {r['best_s'] * 1e3:.0f} ms" for r in rows)
        + f"; engine tokens == transformers: {identical}")
    return rows, identical


def cold_start() -> dict:
    """In a fresh process (best of 3): seconds of ``import course_lib.engine`` (torch's own import
    is most of it) and then of ``LLM("tiny")`` alone."""
    code = ("import time; t = time.perf_counter(); from course_lib.engine import LLM; i = time.perf_counter() - t; "
            "t = time.perf_counter(); LLM('tiny', device='cpu'); print(i, time.perf_counter() - t)")
    runs = [subprocess.check_output([sys.executable, "-c", code], cwd=ROOT, text=True).split() for _ in range(3)]
    return {"import_s": min(float(r[0]) for r in runs), "llm_tiny_s": min(float(r[1]) for r in runs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (for tests)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        print("error: --threads and --repeats must be positive integers", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    import transformers

    ceil = perf.measure_ceilings("cpu", matmul_n=256 if args.smoke else None,
                                 copy_bytes=(16 << 20) if args.smoke else None)
    log(str(ceil))
    repeats = 1 if args.smoke else args.repeats
    rows, identical = [], True
    with tempfile.TemporaryDirectory() as tmp:
        plans = []
        if args.smoke:
            torch.manual_seed(0)
            plans.append(("smoke", GPTConfig(**SMOKE), [(2, 8, 4)]))
        else:
            plans.append(("tiny", None, [(16, 60, 32)]))
            plans.append(("gpt2", GPTConfig(**GPT2_124M), [(1, 64, 32), (8, 64, 32)]))
        for name, config, shapes in plans:
            if config is None:
                from course_lib.tiny import load_tiny

                gpt, _ = load_tiny()
            else:
                from course_lib.model import GPT

                torch.manual_seed(0)
                gpt = GPT(config).eval()
            hf = hf_model(gpt, Path(tmp) / name)
            llm = LLM(gpt, device="cpu")
            for batch, prompt_len, new_tokens in shapes:
                r, same = workload(name, gpt, llm, hf, batch, prompt_len, new_tokens, repeats, seed=1000)
                rows += r
                identical &= same
    result = {
        "date": dt.date.today().isoformat(), "device": perf.device_name("cpu"), "threads": args.threads,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "ceilings": {"matmul_fp32_gflops": ceil.peak_flops / 1e9, "copy_gbps": ceil.bandwidth / 1e9},
        "cold_start": None if args.smoke else cold_start(),
        "engine_tokens_equal_transformers": identical, "runs": rows}
    table = ["| model | batch | prompt -> new | transformers ms | reference ms | engine ms | engine vs transformers |",
             "|---|---|---|---|---|---|---|"]
    for i in range(0, len(rows), 3):
        by = {r["system"]: r for r in rows[i:i + 3]}
        e = by["engine"]
        table.append(f"| {e['model']} | {e['batch']} | {e['prompt_len']} -> {e['new_tokens']} | "
                     f"{by['transformers']['best_s'] * 1e3:.0f} | {by['reference']['best_s'] * 1e3:.0f} | "
                     f"{e['best_s'] * 1e3:.0f} | {e['vs_transformers']:.2f}x |")
    header = (f"{result['device']}, torch {torch.__version__}, transformers {transformers.__version__}, fp32, "
              f"{args.threads} thread(s), {result['date']}; ceilings {ceil.peak_flops / 1e9:.0f} GFLOP/s, "
              f"{ceil.bandwidth / 1e9:.1f} GB/s; cold start in a fresh process: "
              + (f"import {result['cold_start']['import_s']:.2f} s, LLM('tiny') {result['cold_start']['llm_tiny_s']:.2f} s"
                 if result["cold_start"] else "-")
              + f"; greedy tokens identical: {identical}")
    print(header)
    print("\n".join(table))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{result['date']}_{perf.device_slug('cpu')}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    log(f"wrote {args.out / stem}.json")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
