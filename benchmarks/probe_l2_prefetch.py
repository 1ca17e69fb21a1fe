"""A/B on one GPU: the attention kernel of one- and two-row decode steps asking L2 for the first
MLP product's weights (PTX ``prefetch.global.L2``), issued by every program after its PDL wait or
after its key loop, against no prefetch; GPT-2 124M and XL decode at batch 1 and 2, context 512.

    PYTHONPATH=$PWD python3 benchmarks/probe_l2_prefetch.py --out $OUT     # H200: ~3 minutes

The idea: at one row a layer's attention is a chain of dependent loads (~6.6 us at XL) while the
copy engine of the memory sits idle, and the MLP's first product (20 MB at XL) follows it after the
output projection. Engines are built in one process with each setting (fixed at graph capture)
and measured in turns, three rounds of 256 decode steps each; the greedy tokens of every engine
on the same prompts are compared. Writes ``probe_l2_prefetch.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_lib.engine import LLM, SamplingParams  # noqa: E402
from course_lib.engine import benchmark as B  # noqa: E402
from course_lib.engine.attention import TritonAttention  # noqa: E402
from course_lib.engine.fused_forward import FusedForward  # noqa: E402

VARIANTS = {"off": (False, 2), "after_wait": (True, 1), "after_keys": (True, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="gpt2-xl,gpt2")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rows = []
    for shape in args.models.split(","):
        model = B.random_gpt(shape, "cuda", torch.bfloat16, seed=0)
        engines = {}
        for name, (on, where) in VARIANTS.items():
            FusedForward.l2_prefetch, TritonAttention.l2_prefetch_where = on, where
            engines[name] = LLM(model, device="cuda", dtype=torch.bfloat16, num_kv_blocks=1024, max_num_seqs=8,
                                max_num_batched_tokens=2048)
        FusedForward.l2_prefetch, TritonAttention.l2_prefetch_where = False, 2
        prompts = B.random_prompts(2, 64, model.config.vocab_size, seed=7)
        tokens = {name: [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))]
                  for name, llm in engines.items()}
        same = {name: t == tokens["off"] for name, t in tokens.items()}
        for batch in (1, 2):
            got = {name: [] for name in engines}
            for r in range(args.rounds):
                for name, llm in engines.items():
                    got[name].append(B.engine_decode(llm, batch=batch, context=512, steps=256, seed=r)["tokens_per_s"])
            rows.append({"model": shape, "batch": batch, "same_tokens_as_off": same,
                         **{k: [round(v, 1) for v in vs] for k, vs in got.items()}})
            print(json.dumps(rows[-1]), flush=True)
        for llm in engines.values():
            llm.shutdown()
        del engines, model
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_l2_prefetch.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": 256, "context": 512,
         "tokens_per_s": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
