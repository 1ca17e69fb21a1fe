"""Split-KV decode attention (flash-decoding) beside the plain unified kernel, on one GPU.

    PYTHONPATH=$PWD python3 benchmarks/bench_attention.py --out $OUT          # H200: ~1-2 minutes
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/bench_attention.py --smoke --out /tmp/b   # CPU

1. Correctness: course_lib.engine.triton_unified.unified_attention with and without splits against
   a plain fp32 softmax over the gathered keys, bf16 and fp32, on many shapes (batches of decodes,
   contexts that are not multiples of anything, a context of one key, mixed prefill + decode steps,
   cached prefixes), and once replayed from a CUDA graph after the step's tables changed. Prints
   PASS/FAIL and the max error per shape.
2. Kernel timing, per layer call, bf16, block size 16, inside a CUDA graph that calls the kernel on
   enough layers' caches that the K/V does not sit in L2 (as in the engine, 48 layers one after the
   other): decode batches 1, 4, 32 at contexts 512, 2048, 8192 for GPT-2 XL heads (25 x 64) and
   124M heads (12 x 64); the plain kernel (S = 1) against the split path with the engine's S for
   that bucket; GB/s against the K/V bytes each call must read. Then a sweep of split counts, key
   block sizes and warps at batch 1 (GPT-2 XL), for tuning the defaults.
3. Engine: a GPT-2 XL-shaped random-weight engine (whole-step CUDA graphs), decode at batch 1,
   context 512, max_kv_splits=1 (off) against the default.
4. Sweeps of bench_engine's decode and prefill calls over launch configurations, beside the
   engine's choice; the prefill calls also beside torch's fused attention kernels (sdpa_peers);
   and the head-group experiment (attention_head_groups.py). See benchmarks/README.md.

Writes one JSON (device, versions, raw times) to --out. One failing shape is printed and skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import random
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib import perf  # noqa: E402
from course_lib.engine import triton_unified as tu  # noqa: E402
from course_lib.engine import attention_tiles as at  # noqa: E402
from course_lib.engine.attention import multiprocessor_count  # noqa: E402
from course_lib.engine.attention_tiles import build_tiles, kv_splits_for, max_tiles, tile_rows_for  # noqa: E402
from course_lib.engine.config import DEFAULT_MAX_KV_SPLITS  # noqa: E402

#: GPT-2's context (n_positions): the most keys an engine step of GPT-2 can have
GPT2_CONTEXT = 1024

RESULTS = {"correctness": [], "kernel": [], "sweep": [], "engine": [], "errors": []}
T0 = time.perf_counter()
DEADLINE_S = 150          # the sweep, last, stops here


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------ a step's layout on the device
class Step:
    """One attention call's inputs as the engine lays them out: ``layers`` layers of a paged pool
    (blocks scattered at random), the step's sequences (query rows, keys), padded to ``bucket`` rows."""

    def __init__(self, mix, H, Dh, dtype, device, bs=16, layers=1, bucket=None, seed=0, num_blocks=None, width=None,
                 block_m=None):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.mix, self.H, self.Dh, self.layers = mix, H, Dh, layers
        need = [-(-c // bs) for _, c in mix]
        self.num_blocks = num_blocks or sum(need) + 1                         # + the null block 0
        self.pool = torch.empty(layers, 2, self.num_blocks, bs, H, Dh, dtype=dtype, device=device)
        self.pool.normal_(generator=None)
        self.pool[:, :, 0] = float("nan")                                    # never read
        perm = (torch.randperm(self.num_blocks - 1, generator=g) + 1).tolist()
        width = width or max(need) + 1
        tables = torch.zeros(len(mix), width, dtype=torch.long)
        at = 0
        for i, n in enumerate(need):
            tables[i, :n] = torch.tensor(perm[at:at + n])
            at += n
        qstart = [0]
        for q, _ in mix:
            qstart.append(qstart[-1] + q)
        self.qstart, self.ctx, self.N = qstart, [c for _, c in mix], qstart[-1]
        rows = bucket or self.N
        self.block_m = block_m or tile_rows_for(rows)
        self.grid = max_tiles(rows, min(rows, 256), self.block_m) if bucket else None
        seqs, tile_rows = build_tiles(qstart, self.ctx, self.block_m)
        self.grid = max(self.grid or len(seqs), len(seqs))
        pad = lambda xs: torch.tensor(xs + [0] * (self.grid - len(xs)), dtype=torch.long)   # noqa: E731
        self.q = torch.randn(rows, H, Dh, dtype=dtype, device=device)
        self.tables = tables.to(device)
        self.context_lens = torch.tensor(self.ctx, dtype=torch.long, device=device)
        self.query_start = torch.tensor(qstart, dtype=torch.long, device=device)
        self.tile_seq, self.tile_row = pad(seqs).to(device), pad(tile_rows).to(device)
        self.num_tiles = torch.tensor([len(seqs)], dtype=torch.long, device=device)
        self.out = torch.full_like(self.q, float("nan"))

    def call(self, layer=0, num_splits=1, **kw):
        k, v = self.pool[layer, 0], self.pool[layer, 1]
        return tu.unified_attention(self.q, k, v, self.tables, self.context_lens, self.query_start, self.tile_seq,
                                    self.tile_row, self.num_tiles, self.grid, self.block_m, out=self.out,
                                    num_splits=num_splits, **kw)

    def reference(self, layer=0):
        """Plain softmax over each sequence's gathered keys, fp32, causal by absolute position."""
        outs = []
        bs = self.pool.shape[3]
        for i, (a, b) in enumerate(zip(self.qstart, self.qstart[1:])):
            n = self.ctx[i]
            blocks = self.tables[i, :-(-n // bs)]
            keys = self.pool[layer, 0].index_select(0, blocks).view(-1, self.H, self.Dh)[:n].float()
            vals = self.pool[layer, 1].index_select(0, blocks).view(-1, self.H, self.Dh)[:n].float()
            scores = torch.einsum("nhd,shd->hns", self.q[a:b].float(), keys) / math.sqrt(self.Dh)
            pos = torch.arange(n - (b - a), n, device=keys.device)[:, None]
            mask = torch.arange(n, device=keys.device)[None, :] > pos
            outs.append(torch.einsum("hns,shd->nhd", scores.masked_fill(mask, float("-inf")).softmax(-1), vals))
        return torch.cat(outs)

    def engine_splits(self, max_keys: int | None = None) -> int:
        """The split count the engine would launch this step with (attention_tiles.kv_splits_for),
        for a model whose context is ``max_keys`` (None: unbounded)."""
        return kv_splits_for(self.grid, self.H, self.block_m, multiprocessor_count(self.q.device),
                             DEFAULT_MAX_KV_SPLITS, max_keys, self.Dh * self.q.element_size())

    def kv_bytes(self) -> int:
        """K and V bytes one call must read: every key of every sequence, all heads."""
        return 2 * sum(self.ctx) * self.H * self.Dh * self.pool.element_size()


def check(name, step, num_splits, tol, **kw):
    try:
        step.out.fill_(float("nan"))
        out = step.call(num_splits=num_splits, **kw)
        if step.q.is_cuda:
            torch.cuda.synchronize()
        err = (out[:step.N].float() - step.reference()).abs().max().item()
        padded_ok = bool(out[step.N:].isnan().all().item())
        ok = err < tol and padded_ok and not math.isnan(err)
        log(f"{'PASS' if ok else 'FAIL'}  {name}  S={num_splits}  max err {err:.2e}"
            + ("" if padded_ok else "  (padded rows written)"))
        RESULTS["correctness"].append({"shape": name, "num_splits": num_splits, "max_err": err, "pass": ok})
    except Exception as e:  # noqa: BLE001
        log(f"FAIL  {name}  S={num_splits}  {type(e).__name__}: {e}")
        RESULTS["correctness"].append({"shape": name, "num_splits": num_splits, "error": repr(e), "pass": False})


def correctness(device, smoke):
    import random

    rng = random.Random(0)
    dtypes = [torch.float32] if smoke else [torch.bfloat16, torch.float32]
    mixes = {
        "B1 ctx 1": [(1, 1)],
        "B1 ctx 37": [(1, 37)],
        "B3 ctx 5,70,129": [(1, 5), (1, 70), (1, 129)],
        "mixed: decodes + fresh prefill + prefix + chunk": [(1, 40), (1, 7), (23, 23), (17, 70), (40, 95)],
    }
    if not smoke:
        mixes.update({
            "B1 ctx 513": [(1, 513)],
            "B1 ctx 8191": [(1, 8191)],
            "B4 ctx 1,2047,600,3": [(1, 1), (1, 2047), (1, 600), (1, 3)],
            "B5 random": [(1, rng.randint(1, 3000)) for _ in range(5)],
            "B32 random": [(1, rng.randint(1, 2500)) for _ in range(32)],
            "mixed long prefix": [(1, 900), (1, 33), (100, 1500), (64, 64)],
        })
    for H, Dh in ([(2, 32)] if smoke else [(25, 64), (12, 64), (3, 128)]):
        for dtype in dtypes:
            if dtype == torch.float32 and H == 25:
                continue                  # fp32: the 12- and 3-head shapes (fewer compiles)
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            for name, mix in mixes.items():
                try:
                    step = Step(mix, H, Dh, dtype, device, bs=4 if smoke else 16, bucket=None, seed=len(name))
                except Exception as e:  # noqa: BLE001
                    log(f"FAIL  {name}: could not build ({e!r})")
                    continue
                auto = kv_splits_for(step.grid, H, step.block_m, multiprocessor_count(step.q.device),
                                     DEFAULT_MAX_KV_SPLITS)
                label = f"{name} H={H} Dh={Dh} {str(dtype)[6:]}"
                engine_case = dtype == torch.bfloat16 and Dh == 64
                for S in ([1, 3] if smoke else sorted({1, 3, 17} | ({max(2, auto)} if engine_case else set()))):
                    check(label, step, S, tol, **({"block_n": 16} if smoke else {}))
                del step
    if device.type == "cuda":
        graph_correctness(device)


def graph_correctness(device):
    """Capture the split path once (bucket 4), then copy another step's pool, tables and contexts into
    its static tensors and replay: the output must follow the new step (nothing of the first baked in)."""
    try:
        H, Dh, dtype = 25, 64, torch.bfloat16
        shape = dict(bucket=4, num_blocks=200, width=100)
        first = Step([(1, 300), (1, 1000), (1, 17), (1, 64)], H, Dh, dtype, device, seed=5, **shape)
        second = Step([(1, 999), (1, 2), (1, 1500), (1, 129)], H, Dh, dtype, device, seed=6, **shape)
        S = kv_splits_for(first.grid, H, first.block_m, multiprocessor_count(device), DEFAULT_MAX_KV_SPLITS)
        first.call(num_splits=S)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            first.call(num_splits=S)
        for name in ("pool", "q", "tables", "context_lens", "query_start", "tile_seq", "tile_row", "num_tiles"):
            getattr(first, name).copy_(getattr(second, name))
        first.out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        err = (first.out[:second.N].float() - second.reference()).abs().max().item()
        ok = err < 2e-2
        log(f"{'PASS' if ok else 'FAIL'}  CUDA graph replay with new tables  S={S}  max err {err:.2e}")
        RESULTS["correctness"].append({"shape": "graph replay", "num_splits": S, "max_err": err, "pass": ok})
    except Exception as e:  # noqa: BLE001
        log(f"FAIL  CUDA graph replay: {type(e).__name__}: {e}")
        RESULTS["correctness"].append({"shape": "graph replay", "error": repr(e), "pass": False})


# ------------------------------------------------------------------ timing
def time_per_call(fn, calls, device, replays=20) -> float:
    """Seconds per call of ``fn`` (which makes ``calls`` kernel calls): median of ``replays`` replays
    of one CUDA graph holding it (wall clock, best of 3, off CUDA)."""
    fn()
    if device.type != "cuda":
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best / calls
    return perf.captured_seconds([fn], replays) / calls


def decode_step(B, ctx, H, Dh, device, dtype, min_bytes):
    """B decodes at context ``ctx`` padded to the engine's bucket, with enough layers that one graph
    replay reads at least ``min_bytes`` of K/V (so L2 does not hold it)."""
    bucket = 1 << (B - 1).bit_length()
    per_layer = 2 * B * ctx * H * Dh * torch.empty((), dtype=dtype).element_size()
    layers = max(1, min(48, -(-min_bytes // per_layer)))
    return Step([(1, ctx)] * B, H, Dh, dtype, device, layers=layers, bucket=bucket, seed=B + ctx)


def mixed_decode_step(B, lo, hi, H, Dh, device, dtype, min_bytes, seed=0):
    """B decodes whose contexts are uniform in [lo, hi] (seeded; the serving workload's requests
    late in their output), padded to the engine's bucket, with enough layers for ``min_bytes``."""
    rng = random.Random(seed + B)
    ctxs = [rng.randint(lo, hi) for _ in range(B)]
    bucket = 1 << (B - 1).bit_length()
    per_layer = 2 * sum(ctxs) * H * Dh * torch.empty((), dtype=dtype).element_size()
    layers = max(1, min(48, -(-min_bytes // per_layer)))
    return Step([(1, c) for c in ctxs], H, Dh, dtype, device, layers=layers, bucket=bucket, seed=B + hi)


def timed(step, device, reps=2, **kw) -> float:
    def fn():
        for _ in range(reps):
            for layer in range(step.layers):
                step.call(layer=layer, **kw)
    return time_per_call(fn, reps * step.layers, device)


def kernel_timings(device, smoke, peak_gbps):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads = [(25, 64, "gpt2-xl"), (12, 64, "gpt2")] if not smoke else [(2, 32, "smoke")]
    batches, contexts = ((1, 4, 32), (512, 2048, 8192)) if not smoke else ((1,), (40,))
    min_bytes = 256 << 20 if device.type == "cuda" else 0
    log(f"\nper layer call, {str(dtype)[6:]}, block size 16; GB/s = K/V bytes a call must read / time")
    log(f"{'heads':>8} {'B':>3} {'ctx':>5} {'S':>3} {'plain us':>9} {'split us':>9} {'speedup':>7} "
        f"{'plain GB/s':>10} {'split GB/s':>10}")
    for H, Dh, name in heads:
        for B in batches:
            for ctx in contexts:
                try:
                    step = decode_step(B, ctx, H, Dh, device, dtype, min_bytes)
                    # the engine's choice for a model whose context is ctx
                    S = step.engine_splits(ctx)
                    plain = timed(step, device, num_splits=1)
                    split = timed(step, device, num_splits=S) if S > 1 else plain
                    gb = step.kv_bytes() / 1e9
                    row = {"model": name, "H": H, "Dh": Dh, "B": B, "ctx": ctx, "num_splits": S,
                           "layers_in_graph": step.layers, "kv_bytes": step.kv_bytes(),
                           "plain_s": plain, "split_s": split, "speedup": plain / split,
                           "plain_gbps": gb / plain, "split_gbps": gb / split,
                           "split_frac_of_copy_peak": gb / split / peak_gbps if peak_gbps else None}
                    RESULTS["kernel"].append(row)
                    log(f"{name:>8} {B:3} {ctx:5} {S:3} {plain * 1e6:9.1f} {split * 1e6:9.1f} {plain / split:6.2f}x "
                        f"{gb / plain:10.0f} {gb / split:10.0f}")
                    del step
                except Exception as e:  # noqa: BLE001
                    log(f"  {name} B={B} ctx={ctx}: {type(e).__name__}: {e}")
                    RESULTS["errors"].append(f"kernel {name} B{B} ctx{ctx}: {e!r}")
                gc.collect()


def sweep(device, smoke):
    """Batch 1, GPT-2 XL heads: split count x key block x warps, to tune SPLIT_BLOCK_N and the count."""
    if smoke:
        return
    dtype, H, Dh = torch.bfloat16, 25, 64
    auto = kv_splits_for(1, H, 16, multiprocessor_count(device), DEFAULT_MAX_KV_SPLITS)
    log(f"\nsweep, B=1, 25 heads x 64 (engine's S for this bucket: {auto}; SPLIT_BLOCK_N={at.SPLIT_BLOCK_N})")
    for ctx in (512, 2048, 8192):
        try:
            step = decode_step(1, ctx, H, Dh, device, dtype, 256 << 20)
        except Exception as e:  # noqa: BLE001
            log(f"  ctx {ctx}: {e!r}")
            continue
        best = None
        configs = [(S, bn, 4) for S in sorted({8, 16, auto, 32, 64}) for bn in (32, 64, 128)]
        configs += [(S, at.SPLIT_BLOCK_N, 2) for S in sorted({8, 16, auto, 32, 64})]
        for S, block_n, warps in configs:
            if time.perf_counter() - T0 > DEADLINE_S:
                log(f"  sweep stopped at {DEADLINE_S} s (the run must finish in 3 minutes)")
                break
            try:
                t = timed(step, device, reps=1, num_splits=S, block_n=block_n, num_warps=warps)
            except Exception as e:  # noqa: BLE001
                log(f"  ctx {ctx} S={S} block_n={block_n} warps={warps}: {type(e).__name__}")
                continue
            RESULTS["sweep"].append({"ctx": ctx, "num_splits": S, "block_n": block_n, "num_warps": warps,
                                     "s": t, "gbps": step.kv_bytes() / t / 1e9})
            if best is None or t < best[0]:
                best = (t, S, block_n, warps)
        if best:
            cur = [r["s"] for r in RESULTS["sweep"] if r["ctx"] == ctx and r["num_splits"] == auto
                   and r["block_n"] == at.SPLIT_BLOCK_N and r["num_warps"] == 4]
            log(f"  ctx {ctx:5}: best {best[0] * 1e6:6.1f} us at S={best[1]} block_n={best[2]} warps={best[3]}; "
                f"defaults (S={auto}, block_n={at.SPLIT_BLOCK_N}, warps=4): "
                f"{cur[0] * 1e6 if cur else float('nan'):6.1f} us")
        del step
        gc.collect()


DECODE_GRID = {"splits": (1, 2, 4, 8, 16, 32), "block_n": (32, 64, 128), "warps": (2, 4), "stages": (1, 2, 3)}


def decode_sweep(device, smoke, ctx=576, deadline_s=300, batches=(1, 8, 32), mixed=None, heads=(12, 25),
                 grid=None):
    """The bench_engine decode rows' attention calls (GPT-2 124M and XL heads, batches 1, 8, 32,
    context ~576, padded to the engine's bucket): split count x key block x warps x stages, each
    timed over enough layers that L2 does not hold the K/V, beside the engine's current choice.
    ``mixed=(lo, hi)``: each batch's contexts uniform in [lo, hi] instead (the serving workload's).
    ``heads``: which of the two models' head counts to sweep (12: GPT-2 124M, 25: XL). ``grid``: the
    configurations, a dict like :data:`DECODE_GRID` (the default)."""
    if smoke:
        return
    dtype = torch.bfloat16
    grid = {**DECODE_GRID, **(grid or {})}
    t0 = time.perf_counter()
    what = f"contexts uniform in [{mixed[0]}, {mixed[1]}]" if mixed else f"ctx {ctx}"
    log(f"\ndecode sweep, {what}: per layer call, us (GB/s of the K/V a call must read)")
    for H, name in [(h, n) for h, n in ((12, "gpt2"), (25, "gpt2-xl")) if h in heads]:
        for B in batches:
            if mixed:
                step = mixed_decode_step(B, *mixed, H, 64, device, dtype, 256 << 20)
                ctx = max(step.ctx)                               # the longest decides which chunks hold keys
            else:
                step = decode_step(B, ctx, H, 64, device, dtype, 256 << 20)
            auto = step.engine_splits(max(GPT2_CONTEXT, mixed[1]) if mixed else GPT2_CONTEXT)   # for GPT-2
            rows = []
            for S in grid["splits"]:
                for block_n in grid["block_n"]:
                    if S > 1 and -(-ctx // S) < block_n // 2:
                        continue                      # chunks shorter than half a key block: mostly empty programs
                    for warps in grid["warps"]:
                        for stages in grid["stages"]:
                            if time.perf_counter() - t0 > deadline_s:
                                break
                            try:
                                t = timed(step, device, reps=1, num_splits=S, block_n=block_n, num_warps=warps,
                                          num_stages=stages)
                            except Exception as e:  # noqa: BLE001
                                log(f"  {name} B{B} S={S} bn={block_n} w={warps} st={stages}: {type(e).__name__}")
                                continue
                            rows.append({"model": name, "H": H, "B": B, "ctx": ctx, "mixed": mixed, "num_splits": S,
                                         "block_n": block_n, "num_warps": warps, "num_stages": stages, "s": t,
                                         "gbps": step.kv_bytes() / t / 1e9, "engine_splits": auto})
            t_auto = timed(step, device, reps=1, num_splits=auto)
            RESULTS.setdefault("decode_sweep", []).extend(rows)
            RESULTS.setdefault("decode_engine_choice", []).append(
                {"model": name, "B": B, "ctx": ctx, "mixed": mixed, "num_splits": auto, "s": t_auto})
            best = sorted(rows, key=lambda r: r["s"])[:3]
            log(f"  {name:8} B{B:<3} engine (S={auto}, defaults): {t_auto * 1e6:6.1f} us ({step.kv_bytes() / t_auto / 1e9:5.0f})"
                + "".join(f" | {r['s'] * 1e6:6.1f} us S={r['num_splits']} bn={r['block_n']} w={r['num_warps']} "
                          f"st={r['num_stages']}" for r in best))
            del step
            gc.collect()


#: the bench_engine prefill rows' attention calls: (model, heads, prompts of 1,024 tokens)
PREFILL_SHAPES = (("gpt2-xl", 25, 1), ("gpt2-xl", 25, 8), ("gpt2", 12, 8))
PREFILL_T = 1024


#: the prefill sweep's configurations (eight warps were 1.5-3x slower on every shape in session 10)
PREFILL_GRID = {"block_m": (64, 128), "block_n": (32, 64, 128), "warps": (4, 8), "stages": (1, 2, 3)}


def sdpa_peers(B, H, T, Dh, dtype, device, reps=3) -> dict:
    """torch's fused attention kernels on the same prompts, laid out as they want them (contiguous
    (B, H, T, Dh), causal, no paging): seconds a call for each backend that runs on this GPU. The
    bar for our kernel: what the best-known kernels reach on this shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    layers = 2
    q = torch.randn(B, H, T, Dh, dtype=dtype, device=device)
    ks = [torch.randn_like(q) for _ in range(layers)]
    vs = [torch.randn_like(q) for _ in range(layers)]
    out = {}
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            def fn(backend=backend):
                with sdpa_kernel([backend]):
                    for _ in range(reps):
                        for layer in range(layers):
                            torch.nn.functional.scaled_dot_product_attention(q, ks[layer], vs[layer], is_causal=True)
            out[name.lower()] = time_per_call(fn, reps * layers, device)
        except Exception as e:  # noqa: BLE001
            out[name.lower()] = None
            log(f"  sdpa {name}: {type(e).__name__}: {str(e)[:120]}")
    return out


def prefill_sweep(device, smoke, deadline_s=240, grid=None):
    """The bench_engine prefill rows' attention (fresh prompts of 1,024 tokens, no cached prefix):
    rows per tile x keys per trip x warps x stages, each timed per layer call and checked against
    the fp32 reference, beside the engine's choice (``tile_rows_for``, ``default_block_n``, 4 warps,
    2 stages). TFLOP/s counts the causal half of the scores and the P V product, 4 T^2/2 H Dh a prompt."""
    if smoke:
        return
    dtype, Dh, t0 = torch.bfloat16, 64, time.perf_counter()
    grid = {**PREFILL_GRID, **(grid or {})}
    log("\nprefill sweep: per layer call, us (TFLOP/s of the causal attention)")
    for name, H, B in PREFILL_SHAPES:
        T = PREFILL_T
        flops = B * 4 * (T * (T + 1) / 2) * H * Dh
        engine_bm = tile_rows_for(B * T)
        peers = sdpa_peers(B, H, T, Dh, dtype, device)
        RESULTS.setdefault("prefill_sdpa", []).append({"model": name, "H": H, "B": B, "T": T, "s": peers})
        log(f"  {name:8} B{B}x{T} torch sdpa: " + ", ".join(
            f"{k} {v * 1e6:6.1f} us ({flops / v / 1e12:4.0f})" for k, v in peers.items() if v))
        steps = {bm: Step([(T, T)] * B, H, Dh, dtype, device, layers=2, bucket=B * T, seed=B, block_m=bm)
                 for bm in sorted({*grid["block_m"], engine_bm})}
        rows = []
        for bm, step in steps.items():
            ref = step.reference().float()                  # each step has its own random q and pool
            for block_n in grid["block_n"]:
                for warps in grid["warps"]:
                    for stages in grid["stages"]:
                        if time.perf_counter() - t0 > deadline_s:
                            break
                        try:
                            t = timed(step, device, reps=3, block_n=block_n, num_warps=warps, num_stages=stages)
                            err = (step.call(block_n=block_n, num_warps=warps, num_stages=stages).float()
                                   - ref).abs().max().item()
                        except Exception as e:  # noqa: BLE001
                            log(f"  {name} B{B} bm={bm} bn={block_n} w={warps} st={stages}: {type(e).__name__}")
                            continue
                        rows.append({"model": name, "H": H, "B": B, "T": T, "block_m": bm, "block_n": block_n,
                                     "num_warps": warps, "num_stages": stages, "s": t, "tflops": flops / t / 1e12,
                                     "max_err": err, "pass": err < 2e-2})
        step = steps[engine_bm]
        t_engine = timed(step, device, reps=3)
        RESULTS.setdefault("prefill_sweep", []).extend(rows)
        RESULTS.setdefault("prefill_engine_choice", []).append(
            {"model": name, "H": H, "B": B, "T": T, "block_m": engine_bm, "s": t_engine, "tflops": flops / t_engine / 1e12})
        best = sorted((r for r in rows if r["pass"]), key=lambda r: r["s"])[:3]
        log(f"  {name:8} B{B}x{T} engine (bm={engine_bm}, defaults): {t_engine * 1e6:6.1f} us "
            f"({flops / t_engine / 1e12:4.0f})" + "".join(
                f" | {r['s'] * 1e6:6.1f} us bm={r['block_m']} bn={r['block_n']} w={r['num_warps']} st={r['num_stages']}"
                for r in best) + f"; {sum(not r['pass'] for r in rows)} configs off the reference")
        del steps, step
        gc.collect()


#: the head-group experiment's configurations: heads a program, keys a chunk, keys a trip, warps.
#: Compiled offline for sm_90 (triton 3.6 to a cubin, the bundled ptxas -v, the launcher's
#: 16-divisibility of pointers and strides), 16-key trips take 39-72 registers a thread for one
#: head, 61-128 for two, 102-255 for four, without spills; eight heads spill at 2-4 warps
HEAD_GROUPS_GRID = {"heads_per_program": (1, 2, 4), "chunk_keys": (128, 256, 512), "block_n": (16,),
                    "warps": (2, 4, 8)}


def head_groups_sweep(device, smoke, deadline_s=200, grid=None):
    """benchmarks/attention_head_groups.py (one program per sequence, key chunk and group of heads)
    against the engine's unified kernel with its own choice, per layer call, on the decode calls
    that matter: mixed contexts in [100, 2048] at batches 64 and 32 (the serving workload) and
    uniform context 576 at batch 32 (bench_engine's decode rows), both models' heads; each
    configuration also checked against the fp32 reference."""
    from attention_head_groups import head_group_decode

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    if smoke:
        cases = [("smoke", 2, 16, 3, (4, 40))]
        grid = {"heads_per_program": (1, 2), "chunk_keys": (16,), "block_n": (16,), "warps": (4,)}
    else:
        cases = [(name, H, 64, B, ctx) for name, H in (("gpt2", 12), ("gpt2-xl", 25))
                 for B, ctx in ((64, (100, 2048)), (32, (100, 2048)), (32, 576))]
        grid = {**HEAD_GROUPS_GRID, **(grid or {})}
    log("\nhead-group decode experiment: per layer call, us (GB/s of the K/V a call must read)")
    for name, H, Dh, B, ctx in cases:
        if isinstance(ctx, tuple):
            step = mixed_decode_step(B, *ctx, H, Dh, device, dtype, 0 if smoke else 256 << 20)
        else:
            step = decode_step(B, ctx, H, Dh, device, dtype, 256 << 20)
        max_ctx = max(step.ctx)
        auto = step.engine_splits(max(GPT2_CONTEXT, max_ctx))
        t_unified = timed(step, device, reps=1, num_splits=auto)
        q = step.q[:B].contiguous()                                       # the live decode rows
        counters = torch.zeros(B * H, dtype=torch.int32, device=device)
        out = torch.empty_like(q)
        ref = step.reference(0).float()
        rows = []
        for hg in grid["heads_per_program"]:
            for chunk in grid["chunk_keys"]:
                for bn in grid["block_n"]:
                    for warps in grid["warps"]:
                        if time.perf_counter() - t0 > deadline_s:
                            break
                        counters.zero_()                  # a configuration that failed may have left counts behind
                        kw = dict(heads_per_program=hg, chunk_keys=chunk, block_n=bn, num_warps=warps,
                                  counters=counters, out=out)

                        def fn(kw=kw):
                            for layer in range(step.layers):
                                head_group_decode(q, step.pool[layer, 0], step.pool[layer, 1], step.tables,
                                                  step.context_lens, max_ctx, **kw)
                        try:
                            t = time_per_call(fn, step.layers, device)
                            err = (head_group_decode(q, step.pool[0, 0], step.pool[0, 1], step.tables,
                                                     step.context_lens, max_ctx, **kw).float() - ref).abs().max().item()
                        except Exception as e:  # noqa: BLE001
                            log(f"  {name} B{B} hg={hg} chunk={chunk} bn={bn} w={warps}: {type(e).__name__}: {e}")
                            continue
                        rows.append({"model": name, "H": H, "B": B, "ctx": ctx, "heads_per_program": hg,
                                     "chunk_keys": chunk, "block_n": bn, "num_warps": warps, "s": t,
                                     "gbps": step.kv_bytes() / t / 1e9, "max_err": err, "pass": err < 2e-2})
        RESULTS.setdefault("head_groups", []).extend(rows)
        RESULTS.setdefault("head_groups_unified", []).append(
            {"model": name, "H": H, "B": B, "ctx": ctx, "num_splits": auto, "s": t_unified,
             "gbps": step.kv_bytes() / t_unified / 1e9})
        best = sorted((r for r in rows if r["pass"]), key=lambda r: r["s"])[:3]
        log(f"  {name:8} B{B:<3} ctx {ctx}: unified (S={auto}) {t_unified * 1e6:6.1f} us "
            f"({step.kv_bytes() / t_unified / 1e9:5.0f})" + "".join(
                f" | {r['s'] * 1e6:6.1f} us ({r['gbps']:5.0f}) hg={r['heads_per_program']} chunk={r['chunk_keys']} "
                f"bn={r['block_n']} w={r['num_warps']}" for r in best)
            + f"; {sum(not r['pass'] for r in rows)} of {len(rows)} off the reference")
        step = q = out = ref = None                                      # free the pool before the next case
        gc.collect()


# ------------------------------------------------------------------ the engine
def engine_timing(device, smoke):
    from course_lib.engine import LLM, SamplingParams
    from course_lib.engine import benchmark as B

    shape, ctx, dtype = ("smoke", 40, torch.float32) if smoke else ("gpt2-xl", 512, torch.bfloat16)
    model = B.random_gpt(shape, device, dtype)
    outs = {}
    for label, splits in (("off", 1), ("on", None)):
        try:
            t = time.perf_counter()
            opts = dict(device=device, dtype=dtype, max_num_batched_tokens=512 if not smoke else 64, max_num_seqs=8,
                        max_kv_splits=splits)
            if device.type != "cuda":
                opts.update(attention="triton", max_kv_splits=splits or 4)
            llm = LLM(model, **opts)
            build_s = time.perf_counter() - t
            r = B.engine_decode(llm, 1, ctx, steps=64 if not smoke else 4)
            prompts = B.random_prompts(2, 64 if not smoke else 8, model.config.vocab_size, seed=3)
            outs[label] = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))]
            row = {"system": f"engine split {label}", "model": shape, "B": 1, "ctx": ctx,
                   "max_kv_splits": llm.engine.runner.attention.max_kv_splits,
                   "step_ms": 1e3 / r["tokens_per_s"], "tokens_per_s": r["tokens_per_s"], "build_s": build_s}
            RESULTS["engine"].append(row)
            log(f"engine {shape} decode B1 ctx {ctx}, split {label} (max_kv_splits="
                f"{row['max_kv_splits']}): {row['step_ms']:.3f} ms a step, {r['tokens_per_s']:.0f} tok/s")
            del llm
        except Exception as e:  # noqa: BLE001
            log(f"engine split {label}: {type(e).__name__}: {e}")
            traceback.print_exc()
            RESULTS["errors"].append(f"engine {label}: {e!r}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if len(outs) == 2:
        same = sum(a == b for a, b in zip(outs["off"], outs["on"]))
        log(f"engine greedy tokens, split on vs off: {same}/{len(outs['on'])} prompts identical "
            "(bf16 rounding differs between the two paths; random weights make near-ties common)")
        RESULTS["engine_greedy_identical"] = [same, len(outs["on"])]


def parse_grid(text: str | None) -> dict | None:
    """``'block_n=64,128;warps=4'`` → ``{"block_n": (64, 128), "warps": (4,)}``; None stays None."""
    if not text:
        return None
    return {k: tuple(int(v) for v in vs.split(",")) for k, vs in (kv.split("=") for kv in text.split(";"))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU through TRITON_INTERPRET=1)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: correctness,prefill_sweep,head_groups,"
                   "kernel,sweep,engine,decode_sweep")
    p.add_argument("--decode-batches", default="1,8,32", help="batches of the decode sweep")
    p.add_argument("--decode-deadline", type=float, default=300, help="seconds after which the decode sweep "
                   "times only the engine's choice")
    p.add_argument("--decode-grid", default=None, metavar="KEY=V,V;...",
                   help="the decode sweep's configurations, e.g. 'splits=1,2,4;block_n=64,128;warps=4;stages=2,3'")
    p.add_argument("--prefill-deadline", type=float, default=240, help="seconds of the prefill sweep")
    p.add_argument("--prefill-grid", default=None, metavar="KEY=V,V;...",
                   help="the prefill sweep's configurations, e.g. 'block_m=64,128;block_n=64,128;warps=4;stages=1,2'")
    p.add_argument("--head-groups-deadline", type=float, default=200, help="seconds of the head-group experiment")
    p.add_argument("--head-groups-grid", default=None, metavar="KEY=V,V;...",
                   help="the head-group experiment's configurations, e.g. 'heads_per_program=1,2;chunk_keys=256'")
    p.add_argument("--decode-heads", default="12,25", help="head counts of the decode sweep (12: GPT-2 124M, 25: XL)")
    p.add_argument("--decode-mixed", default=None, metavar="LO,HI",
                   help="the decode sweep's contexts uniform in [LO, HI] per batch (e.g. 100,2048: serving's)")
    a = p.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = a.smoke or device.type != "cuda"
    import triton

    RESULTS["meta"] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
                       or "cpu", "sms": multiprocessor_count(device), "torch": torch.__version__,
                       "triton": triton.__version__, "python": platform.python_version(),
                       "split_block_n": at.SPLIT_BLOCK_N, "max_kv_splits": DEFAULT_MAX_KV_SPLITS,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    log(RESULTS["meta"])
    peak = None
    if device.type == "cuda":
        try:
            from course_lib import perf

            peak = perf.measure_ceilings(device, matmul_n=1024, repeats=5).bandwidth / 1e9
            RESULTS["meta"]["copy_gbps"] = peak
            log(f"device copy bandwidth (read + write): {peak:.0f} GB/s")
        except Exception as e:  # noqa: BLE001
            log(f"copy ceiling failed: {e!r}")
    t0 = time.perf_counter()
    parts = [("correctness", lambda: correctness(device, smoke)),
             ("prefill_sweep", lambda: prefill_sweep(device, smoke, a.prefill_deadline, parse_grid(a.prefill_grid))),
             ("head_groups", lambda: head_groups_sweep(device, smoke, a.head_groups_deadline,
                                                       parse_grid(a.head_groups_grid))),
             ("kernel", lambda: kernel_timings(device, smoke, peak)),
             ("engine", lambda: engine_timing(device, smoke)),
             ("sweep", lambda: sweep(device, smoke)),
             ("decode_sweep", lambda: decode_sweep(device, smoke, deadline_s=a.decode_deadline,
                                                   batches=[int(b) for b in a.decode_batches.split(",")],
                                                   heads=[int(h) for h in a.decode_heads.split(",")],
                                                   grid=parse_grid(a.decode_grid),
                                                   mixed=tuple(int(x) for x in a.decode_mixed.split(","))
                                                   if a.decode_mixed else None))]
    for name, fn in parts:
        if name in skip:
            continue
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            RESULTS["errors"].append(f"{name}: {e!r}")
        RESULTS["meta"][f"{name}_s"] = time.perf_counter() - t
        log(f"[{name}: {time.perf_counter() - t:.1f} s]")
    RESULTS["meta"]["total_s"] = time.perf_counter() - t0
    fails = [r for r in RESULTS["correctness"] if not r["pass"]]
    log(f"\ncorrectness: {len(RESULTS['correctness']) - len(fails)} PASS, {len(fails)} FAIL")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "bench_attention_" + RESULTS["meta"]["device"].replace(" ", "-").lower()[:40] + ".json"
    (out / name).write_text(json.dumps(RESULTS, indent=1))
    log(f"wrote {out / name}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
