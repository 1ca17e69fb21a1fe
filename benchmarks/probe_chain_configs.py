"""A/B on one GPU, inside whole decode steps: launch settings that standalone sweeps pick against
the ones the chain of a step may prefer (a kernel's end, not its duration, is what a step pays:
probe_timeline.py). GPT-2 124M and XL decode at batch 1 and 32, context 512.

    PYTHONPATH=$PWD python3 benchmarks/probe_chain_configs.py --out $OUT     # GPU (not run yet: written 2026-12-06)

Variants, each fixed when its engine captures its graphs:

* ``base``: the engine as it is;
* ``ln_x2_small``: add_layernorm's programs with twice their warps (8 at 124M's 768 columns, 16 at
  XL's 1,600) for steps of at most 64 rows (standalone at XL's 32-row decode with five split-K
  partials: 2.06 us at 16 warps against 2.55 at 8, probe_add_layernorm.py);
* ``ln_16_small``: 16 warps at most 64 rows, at both widths;
* ``rows_bn4`` / ``rows_bn16_w8`` / ``rows_w8``: the one- and two-row GEMV (the row kernel) with 4
  weight rows a program; 16 rows and 8 warps; the rule's rows with 8 warps.

All engines are built in one process and measured in turns, three rounds of 128 decode steps each.
Writes ``probe_chain_configs.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import course_lib.engine.triton_fused as TF  # noqa: E402
import course_lib.engine.triton_gemv as G  # noqa: E402
from course_lib.engine import LLM  # noqa: E402
from course_lib.engine import benchmark as B  # noqa: E402

LN_WARPS, ROWS_CONFIG = TF.layernorm_warps, G.rows_config


def ln_small(warps_for):
    return lambda R, D: warps_for(D) if R <= 64 else LN_WARPS(R, D)


def rows_with(block_n=None, warps=4):
    def config(K, N):
        base = ROWS_CONFIG(K, N)
        return G.RowsConfig(block_n=block_n or base.block_n, split=1, num_warps=warps)
    return config


VARIANTS = {
    "base": {},
    "ln_x2_small": {"ln": ln_small(lambda D: 16 if D > 1024 else 8)},
    "ln_16_small": {"ln": ln_small(lambda D: 16)},
    "rows_bn4": {"rows": rows_with(4)},
    "rows_bn16_w8": {"rows": rows_with(16, 8)},
    "rows_w8": {"rows": rows_with(None, 8)},
}


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
        for name, v in VARIANTS.items():
            TF.layernorm_warps, G.rows_config = v.get("ln", LN_WARPS), v.get("rows", ROWS_CONFIG)
            engines[name] = LLM(model, device="cuda", dtype=torch.bfloat16, num_kv_blocks=1700, max_num_seqs=32,
                                max_num_batched_tokens=1024)
        TF.layernorm_warps, G.rows_config = LN_WARPS, ROWS_CONFIG
        for batch in (1, 32):
            got = B.engine_decode_in_turns(engines, batch, context=512, steps=128, rounds=args.rounds)
            rows.append({"model": shape, "batch": batch, **got})
            print(json.dumps(rows[-1]), flush=True)
        for llm in engines.values():
            llm.shutdown()
        del engines, model
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_chain_configs.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "context": 512, "steps": 128,
         "variants": list(VARIANTS), "tokens_per_s": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
