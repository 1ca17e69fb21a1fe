"""A/B on one GPU: GPT-2 XL's weight products at 32 rows (the decode B32 row) in the whole step,
cuBLAS (the table's choice from standalone sweeps) against our kernels, which begin streaming their
weights before they wait for the kernel ahead (programmatic dependent launch) and so may win inside
a step's chain of kernels where they lost alone.

    PYTHONPATH=$PWD python3 benchmarks/probe_b32_products.py --out $OUT     # H200: ~4 minutes

Each variant overrides triton_gemv.MEASURED at 32 rows for XL's QKV (1600 -> 4800) and first MLP
product (1600 -> 6400, bias and GELU in the epilogue) before its engine captures its graphs; all
engines are built in one process and measured in turns (three rounds of 128 decode steps at
context 512, batch 32). Writes ``probe_b32_products.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import course_lib.engine.triton_gemv as G  # noqa: E402
from course_lib.engine import LLM  # noqa: E402
from course_lib.engine import benchmark as B  # noqa: E402


def tile(block_n, split=1, warps=4, stages=4, block_k=128):
    return G.GemvConfig(block_n=block_n, block_k=block_k, split=split, num_warps=warps, use_dot=True, block_m=32,
                        num_stages=stages)


QKV, FC = (1600, 4800, True, 32), (1600, 6400, True, 32)
VARIANTS = {
    "table": {},
    "tile32_both": {QKV: tile(32), FC: tile(32)},
    "tile64_both": {QKV: tile(64), FC: tile(64)},
    "tile32_w8_both": {QKV: tile(32, warps=8), FC: tile(32, warps=8)},
    "tile32_k64_s6_both": {QKV: tile(32, stages=6, block_k=64), FC: tile(32, stages=6, block_k=64)},
    "rows32_split4_both": {QKV: G._dot_rows(32, 4, 4), FC: G._dot_rows(32, 4, 4)},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    model = B.random_gpt("gpt2-xl", "cuda", torch.bfloat16, seed=0)
    shipped = dict(G.MEASURED)
    engines = {}
    for name in args.variants.split(","):
        G.MEASURED.clear()
        G.MEASURED.update({**shipped, **VARIANTS[name]})
        engines[name] = LLM(model, device="cuda", dtype=torch.bfloat16, num_kv_blocks=1700, max_num_seqs=32,
                            max_num_batched_tokens=1024)
        print("built", name, flush=True)
    G.MEASURED.clear()
    G.MEASURED.update(shipped)
    got = B.engine_decode_in_turns(engines, batch=32, context=512, steps=128, rounds=args.rounds)
    print(json.dumps(got), flush=True)
    for llm in engines.values():
        llm.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_b32_products.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": 32, "context": 512,
         "steps": 128, "variants": {k: str(v) for k, v in VARIANTS.items()}, "tokens_per_s": got}, indent=1) + "\n")


if __name__ == "__main__":
    main()
