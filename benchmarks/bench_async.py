"""Asynchronous scheduling on vs off (EngineConfig.async_scheduling), one GPU, one call.

GPT-2 124M's shape with random weights (bf16 on CUDA, the engine's defaults: Triton attention,
whole-step CUDA graphs). For each batch size: greedy, 64-token prompts, ``--new`` tokens each,
EOS ignored.

1. correctness: the tokens with async on equal those with it off (PASS/FAIL per shape);
2. timing: wall time of the whole ``generate`` (best of ``--repeats``), per decode step and in
   output tokens/s, on vs off; the engine's step count (equal: no wasted step at the end).

One failing shape does not stop the others. Writes ``bench_async.json`` into ``--out``.

    PYTHONPATH=$PWD python3 benchmarks/bench_async.py --out $OUT          # on the GPU, ~1-2 min
    PYTHONPATH=$PWD python benchmarks/bench_async.py --smoke --out /tmp/a  # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib import perf  # noqa: E402
from course_lib.engine import LLM, SamplingParams  # noqa: E402
from course_lib.engine.benchmark import random_gpt, random_prompts  # noqa: E402


def run_shape(model, device, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    result = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new}
    tokens = {}
    for on in (True, False):
        llm = LLM(model, device=device, async_scheduling=on, max_num_batched_tokens=2048,
                  num_kv_blocks=max(64, batch * (prompt_len + new) // 16 + 8))
        llm.generate(random_prompts(batch, prompt_len, model.config.vocab_size, seed=1), params)   # warm-up
        best, steps = float("inf"), None
        for r in range(repeats):
            prompts = random_prompts(batch, prompt_len, model.config.vocab_size, seed=100 + r)  # no prefix hits
            n0 = llm.engine.num_steps
            perf.synchronize(device)
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            secs = time.perf_counter() - t
            best, steps = min(best, secs), llm.engine.num_steps - n0
            if r == 0:
                tokens[on] = [o.token_ids for o in outs]
        key = "on" if on else "off"
        result[key] = {"seconds": best, "steps": steps, "ms_per_step": 1e3 * best / steps,
                       "output_tokens_per_s": batch * new / best}
        del llm
    result["tokens_equal"] = tokens[True] == tokens[False]
    result["speedup"] = result["off"]["seconds"] / result["on"]["seconds"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="the tiny model on this machine's device, a few tokens")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        from course_lib.tiny import load_tiny

        model, _ = load_tiny(device=device)
        shapes, new, repeats = [1, 4], 8, 1
    else:
        model = random_gpt("gpt2", device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        shapes, new, repeats = [1, 8, 32, 128], args.new, args.repeats
    info = {"device": perf.device_name(device), "torch": torch.__version__, "python": platform.python_version(),
            "model": "tiny" if args.smoke else "gpt2-124M random", "results": []}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    for batch in shapes:
        try:
            r = run_shape(model, device, batch, 64 if not args.smoke else 16, new, repeats)
            info["results"].append(r)
            print(f"B={batch:4}: tokens {'PASS' if r['tokens_equal'] else 'FAIL'} (async on == off); "
                  f"steps on {r['on']['steps']} off {r['off']['steps']}; ms/step on {r['on']['ms_per_step']:.3f} "
                  f"off {r['off']['ms_per_step']:.3f}; speedup {r['speedup']:.2f}x", flush=True)
        except Exception as e:                                  # one shape failing must not stop the rest
            traceback.print_exc()
            print(f"B={batch:4}: FAIL ({type(e).__name__}: {e})", flush=True)
            info["results"].append({"batch": batch, "error": repr(e)})
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_async.json"
    path.write_text(json.dumps(info, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
