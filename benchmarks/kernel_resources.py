"""Registers, spills and shared memory of our Triton kernels compiled for an H100/H200 (sm_90), offline.

    python benchmarks/kernel_resources.py [--out FILE.json]

No GPU is needed: ``triton.compile`` lowers a kernel to a cubin for a named target on any machine,
and the triton wheel carries NVIDIA's ``ptxas``, whose ``-v`` prints what the kernel uses. How many
programs an SM can hold follows from that (65,536 registers and ~227 KB of shared memory an SM on
an H200), and so how many of a decode step's memory requests can be in flight. The launcher
specialises pointers and integer arguments that are multiples of 16 (``tt.divisibility``); without
that hint the loads are not vectorised and the register counts come out ~2-3x too high, so each
kernel here names the arguments that are multiples of 16 at the engine's shapes.

Printed for the engine's unified attention kernel (course_lib/engine/triton_unified.py) at the
launch shapes the engine picks for bench_engine's rows, and for the head-group experiment
(benchmarks/attention_head_groups.py) at the shapes bench_attention's ``head_groups`` part sweeps.
``tests/test_kernel_resources.py`` keeps the engine's decode shape free of spills and pipelined.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

#: an H100/H200: compute capability 9.0, 32-thread warps
SM90 = GPUTarget("cuda", 90, 32)
REGISTERS_PER_SM = 65536
SHARED_BYTES_PER_SM = 232448
MAX_THREADS_PER_SM = 2048
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def compile_resources(kernel, signature: dict[str, str], constexprs: dict, num_warps: int, num_stages: int,
                      divisible=()) -> dict:
    """Compile ``kernel`` for sm_90 and read its resources: registers a thread, spill bytes, shared
    memory bytes, whether any load goes through ``cp.async`` (Triton's software pipelining), whether
    its products run as Hopper's asynchronous warpgroup MMAs (``wgmma``, not ``mma.sync``), and
    how many programs fit on one SM. ``signature``: every non-constexpr argument's Triton type
    (``"*bf16"``, ``"i32"``, ...); ``divisible``: integer arguments that are multiples of 16 (every
    pointer is taken as 16-byte aligned, as torch allocates)."""
    names = kernel.arg_names
    sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in names}
    hinted = [n for n in names if sig[n].startswith("*")] + list(divisible)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs), target=SM90,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", path, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    shared = compiled.metadata.shared
    threads = 32 * num_warps
    fits = min(REGISTERS_PER_SM // (registers * threads), MAX_THREADS_PER_SM // threads,
               SHARED_BYTES_PER_SM // shared if shared else 32, 32)
    return {"registers": registers, "spill_bytes": spills, "shared_bytes": shared, "cp_async": "cp.async" in ptx,
            "wgmma": "wgmma.mma_async" in ptx, "programs_per_sm": fits}


#: the attention kernels' pointer arguments that are not int64 tables: bf16 activations and pool,
#: fp32 split partials, int32 arrival counters
POINTER_TYPES = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16",
                 "part_ml_ptr": "*fp32", "part_acc_ptr": "*fp32", "arrived_ptr": "*i32"}


def attention_signature(kernel) -> dict[str, str]:
    """Triton types of an attention kernel's arguments, by name: :data:`POINTER_TYPES`, other
    ``*_ptr`` arguments int64 tables, ``qk_scale`` fp32, every other integer int32."""
    return {n: POINTER_TYPES.get(n, "*i64" if n.endswith("_ptr") else "fp32" if n == "qk_scale" else "i32")
            for n in kernel.arg_names}


# ---------------------------------------------------------------------------- the engine's attention


def unified_resources(block_m: int, block_n: int, num_splits: int, num_warps: int = 4, num_stages: int = 2) -> dict:
    """The unified kernel at one launch shape, bf16, 64-wide heads, 16-slot blocks, PDL on."""
    from course_lib.engine import triton_unified as tu

    kernel = tu._unified_attention_kernel
    constexprs = dict(HEAD_DIM=64, HEAD_DIM_P2=64, BLOCK_SIZE=16, BLOCK_M=block_m, BLOCK_N=block_n, DOT_FP32=False,
                      IEEE=False, WHILE_LOOP=False, NUM_SPLITS=num_splits, USE_PDL=True)
    # multiples of 16 at GPT-2's shapes: the q/out/pool/partial-acc strides (H * 64, 64, 16 * H * 64, ...);
    # not the block-table width or the m/l partials' strides (multiples of H)
    divisible = [n for n in kernel.arg_names if n.startswith("stride_")
                 and n not in ("stride_tb", "stride_mlk", "stride_mls", "stride_mln")]
    return compile_resources(kernel, attention_signature(kernel), constexprs, num_warps, num_stages, divisible)


def engine_attention_shapes() -> list[tuple[str, int, int, int, int]]:
    """(label, block_m, block_n, num_splits, num_stages) of the unified kernel for bench_engine's rows,
    from the engine's own rules (attention_tiles) on a 132-SM GPU, GPT-2's 2,048 positions, 128-byte heads."""
    from course_lib.engine.attention_tiles import (default_block_n, default_num_stages, kv_splits_for, max_tiles,
                                                   tile_rows_for)
    from course_lib.engine.config import DEFAULT_MAX_KV_SPLITS

    shapes = []
    for label, tokens, seqs, heads in (("decode B1, XL", 1, 1, 25), ("decode B1, 124M", 1, 1, 12),
                                       ("decode B32, XL", 32, 32, 25), ("decode B64, 124M", 64, 64, 12),
                                       ("prefill 1 x 1024", 1024, 1, 25), ("prefill 8 x 1024", 8192, 8, 25)):
        block_m = tile_rows_for(tokens)
        grid = max_tiles(tokens, seqs, block_m)
        splits = kv_splits_for(grid, heads, block_m, 132, DEFAULT_MAX_KV_SPLITS, 2048, 128)
        block_n = default_block_n(block_m, grid, splits, 128, tokens)
        shapes.append((label, block_m, block_n, splits, default_num_stages(block_m, block_n)))
    return shapes


# ---------------------------------------------------------------------------- the head-group experiment
def head_group_resources(heads: int, heads_per_program: int, block_n: int = 16, num_warps: int = 4) -> dict:
    from attention_head_groups import _head_group_decode_kernel as kernel

    constexprs = {"H": heads, "HG": heads_per_program, "GROUPS": -(-heads // heads_per_program), "DH": 64,
                  "BLOCK_SIZE": 16, "BLOCK_N": block_n, "MAX_CHUNKS": 8, "WHILE_LOOP": False}
    return compile_resources(kernel, attention_signature(kernel), constexprs, num_warps, 2,
                             ["stride_qn", "stride_kblock", "stride_kslot", "stride_on", "chunk_keys"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    a = p.parse_args(argv)
    rows = []
    print(f"{'kernel':50} {'regs':>5} {'spill B':>7} {'smem B':>7} {'cp.async':>8} {'wgmma':>6} {'progs/SM':>8}")
    for label, block_m, block_n, splits, stages in engine_attention_shapes():
        r = unified_resources(block_m, block_n, splits, num_stages=stages)
        rows.append({"kernel": "unified", "shape": label, "block_m": block_m, "block_n": block_n,
                     "num_splits": splits, "num_warps": 4, "num_stages": stages, **r})
    for heads in (12, 25):
        for hg in (1, 2, 4):
            for warps in (2, 4, 8):
                r = head_group_resources(heads, hg, num_warps=warps)
                rows.append({"kernel": "head_groups", "shape": f"{heads} heads", "heads_per_program": hg,
                             "block_n": 16, "num_warps": warps, **r})
    for r in rows:
        name = (f"unified {r['shape']} ({r['block_m']} x {r['block_n']}, S={r['num_splits']}, {r['num_stages']} st)"
                if r["kernel"] == "unified"
                else f"head groups, {r['shape']}, {r['heads_per_program']} a program, {r['num_warps']} warps")
        print(f"{name:50} {r['registers']:5} {r['spill_bytes']:7} {r['shared_bytes']:7} {str(r['cp_async']):>8} "
              f"{str(r['wgmma']):>6} {r['programs_per_sm']:8}")
    if a.out:
        a.out.write_text(json.dumps({"target": "sm_90", "triton": triton.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
