"""Tile sizes, warps and stages of the unified attention kernel, timed beside SDPA (GPU).

    python benchmarks/tune_unified.py

Shapes: 8 fresh prefills of 1024 tokens with GPT-2 small (12 heads) and XL (25 heads) of 64 dims,
bf16, block size 16. Prints microseconds per call and achieved TFLOP/s (causal FLOPs).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_lib.engine.attention_tiles import build_tiles  # noqa: E402
from course_lib.engine.triton_unified import unified_attention  # noqa: E402


def main():
    dev, dt, bs, B, T, Dh = "cuda", torch.bfloat16, 16, 8, 1024, 64
    for H in (12, 25):
        N = B * T
        q, k, v = (torch.randn(N, H, Dh, device=dev, dtype=dt) for _ in range(3))
        blocks = N // bs + 1
        k_pool = torch.zeros(blocks, bs, H, Dh, device=dev, dtype=dt)
        v_pool = torch.zeros_like(k_pool)
        k_pool.view(-1, H, Dh)[bs:] = k                       # block 0 is the null block
        v_pool.view(-1, H, Dh)[bs:] = v
        tables = (torch.arange(N // bs, device=dev, dtype=torch.int32).view(B, -1) + 1)
        lens = torch.full((B,), T, device=dev, dtype=torch.int32)
        qs = [i * T for i in range(B + 1)]
        flops = 4 * B * H * Dh * T * T / 2
        dense = [t.view(B, T, H, Dh).transpose(1, 2) for t in (q, k, v)]
        ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(*dense, is_causal=True), return_mode="median")
        print(f"H={H}: SDPA {ms * 1e3:8.1f} us  {flops / ms / 1e9:6.1f} TFLOP/s")
        ref = F.scaled_dot_product_attention(*dense, is_causal=True).transpose(1, 2).reshape(N, H, Dh)
        qs_d = torch.tensor(qs, device=dev, dtype=torch.int32)
        results = []
        for bm, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
            seq, row = build_tiles(qs, [T] * B, bm)
            ts = torch.tensor(seq, device=dev, dtype=torch.int32)
            tr = torch.tensor(row, device=dev, dtype=torch.int32)
            cnt = torch.tensor([len(seq)], device=dev, dtype=torch.int32)
            fn = lambda: unified_attention(q, k_pool, v_pool, tables, lens, qs_d, ts, tr, cnt, len(seq), bm,  # noqa: E731
                                           block_n=bn, num_warps=w, num_stages=st)
            try:
                out = fn()
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                ms = triton.testing.do_bench(fn, return_mode="median")
            except Exception as e:  # out of shared memory and the like
                print(f"  BLOCK_M={bm} BLOCK_N={bn} warps={w} stages={st}: {type(e).__name__}")
                continue
            results.append((ms, bm, bn, w, st, err))
        for ms, bm, bn, w, st, err in sorted(results)[:6]:
            print(f"  BLOCK_M={bm:3} BLOCK_N={bn:3} warps={w} stages={st}: {ms * 1e3:8.1f} us "
                  f"{flops / ms / 1e9:6.1f} TFLOP/s  rel err {err:.1e}")
        cur = [r for r in results if r[1:5] == (64, 64, 4, 2)]
        if cur:
            print(f"  current default (64, 64, 4, 2): {cur[0][0] * 1e3:8.1f} us")


if __name__ == "__main__":
    main()
