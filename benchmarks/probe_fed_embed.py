"""A/B on one GPU: the device-fed token ids read inside the embed kernel (now) against torch's
gather before it (before 2026-12-03), GPT-2 124M and XL decode at batch 1 and 32, context 512.

    PYTHONPATH=$PWD python3 benchmarks/probe_fed_embed.py --out $OUT     # H200: ~2 minutes

Both engines are built in one process (the old path by wrapping fused_forward's embed_layernorm
with the torch gather it replaced, before the graphs are captured) and measured in turns, three
rounds of 256 decode steps each. Writes ``probe_fed_embed.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import course_lib.engine.fused_forward as FF  # noqa: E402
from course_lib.engine import LLM  # noqa: E402
from course_lib.engine import benchmark as B  # noqa: E402

FUSED = FF.embed_layernorm


def torch_gather_first(ids, pos, wte, wpe, ln, feed_rows=None, fed_tokens=None):
    """The path before: the fed ids gathered by torch (four launches), then the kernel."""
    if feed_rows is not None:
        ids = torch.where(feed_rows > 0, fed_tokens[(feed_rows - 1).clamp(min=0)], ids)
    return FUSED(ids, pos, wte, wpe, ln)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="gpt2,gpt2-xl")
    args = p.parse_args()
    rows = []
    for shape in args.models.split(","):
        model = B.random_gpt(shape, "cuda", torch.bfloat16, seed=0)
        engines = {}
        for name, fn in (("in_kernel", FUSED), ("torch_gather", torch_gather_first)):
            FF.embed_layernorm = fn
            engines[name] = LLM(model, device="cuda", dtype=torch.bfloat16, num_kv_blocks=4096, max_num_seqs=64)
        FF.embed_layernorm = FUSED
        for batch in (1, 32):
            got = B.engine_decode_in_turns(engines, batch, context=512, steps=256, rounds=3)
            rows.append({"model": shape, "batch": batch, **{k: [round(v) for v in vs] for k, vs in got.items()}})
            print(rows[-1], flush=True)
        for llm in engines.values():
            llm.shutdown()
        del engines, model
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_fed_embed.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": 256, "context": 512,
         "tokens_per_s": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
