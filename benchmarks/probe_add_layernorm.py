"""The residual add + LayerNorm kernel (triton_fused.add_layernorm) at prefill shapes and the XL
batch-32 decode's: its warps swept, on one GPU (a block of rows a program was swept too, on
2026-12-06, and was slower at every shape: ``..._probe_add_layernorm.json``).

    PYTHONPATH=$PWD python3 benchmarks/probe_add_layernorm.py --out $OUT     # H200: ~30 s

A prefill step of GPT-2 XL runs 97 of these on (tokens, 1,600) rows (0.46 ms of the 1 x 1,024
step, 2.7 ms of the 8 x 1,024 one on an H200, benchmarks/NOTES.md). Each launch here reads the
residual stream and a bf16 delta plus its bias (at decode, five fp32 split-K partials), writes the
new stream and its LayerNorm; each is checked against the engine's launch first. Timed in a CUDA
graph of 20 calls, each on its own buffers (the 8 x 1,024 shapes miss in L2; the 1 x 1,024 ones
partly fit, as in the step, where the GEMM just wrote the delta). Writes ``probe_add_layernorm.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import course_lib.engine.triton_fused as TF  # noqa: E402
from course_lib import perf  # noqa: E402


def engine_kernel(warps: int):
    """add_layernorm with its programs fixed at ``warps``."""
    def run(x, ln, delta, delta_bias):
        saved = TF.layernorm_warps
        TF.layernorm_warps = lambda R, D: warps
        try:
            return TF.add_layernorm(x, ln, delta=delta, delta_bias=delta_bias)
        finally:
            TF.layernorm_warps = saved
    return run


def graph_time(fn, sets) -> float:
    """Microseconds a call: the median replay of a CUDA graph of one call per input set (perf's
    timing of kernels; the 2026-12-06 results took the mean of 5 replays of the same graph)."""
    return perf.captured_seconds([lambda s=s: fn(*s) for s in sets]) * 1e6 / len(sets)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    results = []
    for name, N, D, splits in (("XL 1 x 1,024", 1024, 1600, 0), ("XL 8 x 1,024", 8192, 1600, 0),
                               ("124M 1 x 1,024", 1024, 768, 0), ("124M 8 x 1,024", 8192, 768, 0),
                               ("XL decode B32, 5 split-K partials", 32, 1600, 5)):
        ln = torch.nn.LayerNorm(D, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
        sets = [(torch.randn(N, D, device="cuda", dtype=torch.bfloat16),
                 torch.randn(splits, N, D, device="cuda", dtype=torch.float32) if splits
                 else torch.randn(N, D, device="cuda", dtype=torch.bfloat16),
                 torch.randn(D, device="cuda", dtype=torch.bfloat16)) for _ in range(20)]
        ref_x, ref_h = engine_kernel(8 if D > 1024 else 4)(sets[0][0], ln, sets[0][1], sets[0][2])
        row = {"shape": name, "N": N, "D": D, "engine_warps": TF.layernorm_warps(N, D),
               "engine_us": graph_time(lambda x, d, db: TF.add_layernorm(x, ln, delta=d, delta_bias=db), sets)}
        for warps in (1, 2, 4, 8, 16):
            run = engine_kernel(warps)
            got_x, got_h = run(sets[0][0], ln, sets[0][1], sets[0][2])
            same = torch.equal(got_x, ref_x) and (got_h.float() - ref_h.float()).abs().max().item() <= 0.0625
            us = graph_time(lambda x, d, db: run(x, ln, d, db), sets)
            row[f"warps{warps}_us"] = round(us, 2) if same else f"WRONG ({us:.2f} us)"
        results.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_add_layernorm.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
         "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
