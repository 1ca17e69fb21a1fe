"""A/B on one GPU: the attention kernel loading its first key block's cached keys before it waits
for the kernel ahead (triton_unified.py, "Before the wait") against loading them after it.

    PYTHONPATH=$PWD python3 benchmarks/probe_prefetch_kv.py --out $OUT     # H200: ~1 minute

GPT-2 124M and XL shapes (random weights, bf16): both engines built in one process (the switch
``triton_unified.PREFETCH_CACHED_KEYS`` is read when the step graphs are captured), first the
same greedy tokens from both on prompts of several lengths (the loads move, the arithmetic does
not: the tokens must be equal), then decode at batch 1, 4 and 32, context 512, three rounds of 256
steps each, in turns (batch 32 runs no split-KV: the same kernel in both). Writes
``probe_prefetch_kv.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import course_lib.engine.triton_unified as U  # noqa: E402
from course_lib.engine import LLM, SamplingParams  # noqa: E402
from course_lib.engine import benchmark as B  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="gpt2,gpt2-xl")
    args = p.parse_args()
    rows, equal = [], {}
    for shape in args.models.split(","):
        model = B.random_gpt(shape, "cuda", torch.bfloat16, seed=0)
        engines = {}
        for name, on in (("before_wait", True), ("after_wait", False)):
            U.PREFETCH_CACHED_KEYS = on
            engines[name] = LLM(model, device="cuda", dtype=torch.bfloat16, num_kv_blocks=4096, max_num_seqs=64)
        U.PREFETCH_CACHED_KEYS = True
        prompts = [B.random_prompts(1, (n, n), model.config.vocab_size, seed=n)[0] for n in (5, 40, 300, 700)]
        tokens = {name: [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))]
                  for name, llm in engines.items()}
        equal[shape] = tokens["before_wait"] == tokens["after_wait"]
        print(shape, "tokens equal:", equal[shape], flush=True)
        for batch in (1, 4, 32):
            got = {name: [] for name in engines}
            for r in range(3):
                for name, llm in engines.items():
                    got[name].append(B.engine_decode(llm, batch=batch, context=512, steps=256, seed=r)["tokens_per_s"])
            rows.append({"model": shape, "batch": batch, **{k: [round(v) for v in vs] for k, vs in got.items()}})
            print(rows[-1], flush=True)
        for llm in engines.values():
            llm.shutdown()
        del engines, model
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_prefetch_kv.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": 256, "context": 512,
         "tokens_equal": equal, "tokens_per_s": rows}, indent=1) + "\n")
    if not all(equal.values()):
        sys.exit("the two engines' tokens differ")


if __name__ == "__main__":
    main()
