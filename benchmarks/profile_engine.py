"""Where does an engine step spend its time? Host (cProfile) and device (torch.profiler) views.

    python benchmarks/profile_engine.py --model gpt2 --batch 8 --prompt-len 1024

Prints the top host functions of a prefill ``generate`` call, the top CUDA kernels, and the time
of the bare model forward on the same batch, so the gap between them is the engine's overhead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_lib.engine import LLM, SamplingParams  # noqa: E402
from course_lib import perf  # noqa: E402
from course_lib.engine import benchmark as B  # noqa: E402


def timed(fn, device, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        perf.synchronize(device)
        t = time.perf_counter()
        fn()
        perf.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--graphs", choices=["on", "off"], default="on", help="whole-step CUDA graphs (on CUDA)")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = B.random_gpt(a.model, device, dtype)
    llm = LLM(model, device=device, dtype=dtype, max_num_batched_tokens=a.batch * a.prompt_len,
              cuda_graphs=None if a.graphs == "on" else False)
    prompts = lambda s: B.random_prompts(a.batch, a.prompt_len, model.config.vocab_size, s)  # noqa: E731
    seed = [0]

    def prefill():
        seed[0] += 1
        llm.generate(prompts(seed[0]), SamplingParams(max_tokens=1, ignore_eos=True))

    prefill()
    t_gen = timed(prefill, device)
    ids = torch.tensor(prompts(999), device=device)
    with torch.no_grad():
        t_fwd = timed(lambda: model(ids, last_only=True), device)
    n = a.batch * a.prompt_len
    print(f"generate (prefill, max_tokens=1): {t_gen * 1e3:.2f} ms = {n / t_gen:,.0f} tok/s")
    print(f"reference model forward, same batch: {t_fwd * 1e3:.2f} ms = {n / t_fwd:,.0f} tok/s")

    prof = cProfile.Profile()
    prof.enable()
    prefill()
    perf.synchronize(device)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
            prefill()
            perf.synchronize(device)
        print(tp.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
