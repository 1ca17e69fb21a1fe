"""Probe: decode GEMVs on K-contiguous weights (the row kernel) against cuBLAS, on one GPU.

Session 6's question (benchmarks/NOTES.md): GPT-2 XL's decode step at one row is bound by its
weight stream, and cuBLAS streams the 5-20 MB projections at ~2 TB/s of the H200's ~4.2. Our
tile GEMV on the Conv1D layout (N contiguous) lost to cuBLAS there. Does a kernel that reads whole
weight rows (the ``nn.Linear`` layout, K contiguous), loading all of a program's weights before
its programmatic-dependent-launch wait, stream them faster? And does storing the projections K
contiguous cost cuBLAS anything (decode at 8-32 rows, prefill at 1024-8192 rows)?

Parts, each timed as CUDA-graph replays (benchmarks time kernels this way):

* ``check``: the row kernel against an fp32 product on every shape (bias, GELU, split-K partials);
* ``shapes``: per shape at one row, over enough distinct weight copies that L2 holds none: cuBLAS on
  both layouts, the tile kernel on the Conv1D layout, and row-kernel configs;
* ``chain``: all of one token's weight products, each feeding the next (48 x 4 + the LM head for
  XL), cuBLAS on both layouts, the tile kernel, and the best row configs per shape;
* ``cublas_rows``: cuBLAS on both layouts at 8, 32, 1024 and 8192 rows (decode B8/B32, prefill);
* ``rows_m``: 2-16 token rows on K-contiguous weights: cuBLAS, the row kernel, the tile kernel;
* ``rows_dot``: 4-32 token rows: the row kernel on the tensor cores over block sizes and splits,
  cuBLAS and the tile kernel; the fastest per shape and row count makes a table, which
* ``engine`` puts in force (triton_gemv.MEASURED) for bench_engine.py's decode rows, engine only.

    python benchmarks/probe_gemv_rows.py --out DIR [--parts rows_m,...]

Results: ``benchmarks/results/2026-12-01_nvidia-h200_probe_gemv_rows.json`` (parts check, shapes,
chain, cublas_rows; run before the engine changed, so its ``plan`` column is the engine's GEMV plan
of that time: one-trip PDL tiles on the Conv1D layout for 124M, cuBLAS for XL, the tile kernel for
the LM heads) and ``..._probe_gemv_rows_m.json`` (parts check, rows_m).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from course_lib import perf  # noqa: E402
from course_lib.engine import triton_gemv as G  # noqa: E402
from course_lib.engine.fused_forward import padded_vocab  # noqa: E402

HEAD = padded_vocab(50257)   # the engine's LM head: wte padded to 50,304 rows (fused_forward)
SHAPES = {   # (K, N): the four products of a layer, then the LM head
    "gpt2": [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, HEAD)],
    "gpt2-xl": [(1600, 4800), (1600, 1600), (1600, 6400), (6400, 1600), (1600, HEAD)],
}
LAYERS = {"gpt2": 12, "gpt2-xl": 48}
RES: dict = {"check": [], "shapes": [], "chain": [], "cublas_rows": [], "rows_m": [], "rows_dot": [], "errors": []}
T0 = time.perf_counter()
DEV, DT = "cuda", torch.bfloat16


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def row_configs(K: int, N: int) -> list[G.RowsConfig]:
    out = []
    for split in (1, 2, 4, 8):
        if split > 1 and K // split < 384:
            continue
        for bn in (2, 4, 8, 16, 32):
            for warps in (4, 8):
                c = G.RowsConfig(block_n=bn, split=split, num_warps=warps)
                tile = bn * triton.next_power_of_2(c.k_per_split(K))
                if 2048 <= tile <= 32768 and triton.cdiv(N, bn) * c.num_splits(K) >= 132:
                    out.append(c)
    return out


def weights(K, N):
    """Distinct (N, K) weight copies, enough that L2 holds none (an LM head: one matrix of 77-161 MB,
    three times), and the products' bias (None for a head, which has none)."""
    head = N > 10000
    if head:
        nk = [torch.randn(N, K, device=DEV, dtype=DT) * 0.02] * 3
    else:
        nk = [torch.randn(N, K, device=DEV, dtype=DT) * 0.02 for _ in range(max(2, min(64, (600 << 20) // (K * N * 2))))]
    return nk, None if head else torch.zeros(N, device=DEV, dtype=DT)


#: the tile-kernel configs bench_kernels.py's sweep found best for the LM heads at 1-32 rows
HEAD_TILES = [G.GemvConfig(block_n=64, block_k=128, split=1, num_warps=4, use_dot=True),
              G.GemvConfig(block_n=64, block_k=64, split=1, num_warps=4, use_dot=True),
              G.GemvConfig(block_n=128, block_k=64, split=1, num_warps=8, use_dot=True),
              G.GemvConfig(block_n=256, block_k=64, split=1, num_warps=8, use_dot=True)]


def head_tile(K, N):
    """The engine's tile kernel for an LM head (triton_gemv's table, at 8 rows)."""
    return G.plan_gemv(8, K, N, k_contiguous=True)


def cublas_nk_s(x, b, nk, outs) -> float:
    """Seconds a call of cuBLAS on the K-contiguous weights (``x @ w.T``)."""
    if b is None:
        return per_call([lambda w=w, o=o: torch.mm(x, w.t(), out=o) for w, o in zip(nk, outs)])
    return per_call([lambda w=w, o=o: torch.addmm(b, x, w.t(), out=o) for w, o in zip(nk, outs)])


def per_call(fns) -> float:
    return perf.captured_seconds(fns, replays=15) / len(fns)


def check():
    g = torch.Generator(device=DEV).manual_seed(0)
    for model, shapes in SHAPES.items():
        for K, N in shapes:
            w = (torch.randn(N, K, device=DEV, dtype=DT, generator=g) * 0.02).t()        # (K, N), K contiguous
            b = torch.randn(N, device=DEV, dtype=DT, generator=g) * 0.02
            for M in (1, 2, 5, 32, 40):
                x = torch.randn(M, K, device=DEV, dtype=DT, generator=g)
                ref = x.float() @ w.float() + b.float()
                plain = row_configs(K, N)[:3] + row_configs(K, N)[-2:] if M <= G.ROWS_MAX_M else []
                for cfg in plain + dot_configs(K, N)[:2] + dot_configs(K, N)[-2:]:
                    try:
                        y = G.gemv(x, w, b, config=cfg).float()
                        yg = G.gemv(x, w, b, gelu=True, config=cfg).float()
                        p = G.gemv_partials(x, w, cfg).sum(0)
                    except triton.runtime.errors.OutOfResources as e:     # a tile too big for shared memory
                        RES["check"].append({"model": model, "K": K, "N": N, "M": M, "config": cfg.__dict__,
                                             "error": repr(e)[:200]})
                        continue
                    err = max((y - ref).abs().max().item(), (yg - F.gelu(ref, approximate="tanh")).abs().max().item(),
                              (p - (ref - b.float())).abs().max().item())
                    ok = err <= 2e-2 * ref.abs().max().item() + 1e-3
                    RES["check"].append({"model": model, "K": K, "N": N, "M": M, "config": cfg.__dict__,
                                         "max_err": err, "ok": ok})
                    if not ok:
                        log(f"CHECK FAIL {model} {K}->{N} M={M} {cfg}: {err}")
    ran = [c for c in RES["check"] if "ok" in c]
    log(f"check: {sum(c['ok'] for c in ran)}/{len(ran)} PASS ({len(RES['check']) - len(ran)} out of resources)")


def shapes_part():
    best = {}
    for model, shapes in SHAPES.items():
        for K, N in shapes:
            head = N > 10000
            nk, _ = weights(K, N)
            kn = [nk[0].t().contiguous()] * 3 if head else [w.t().contiguous() for w in nk]   # the Conv1D layout, (K, N)
            b = torch.zeros(N, device=DEV, dtype=DT)
            x = torch.randn(1, K, device=DEV, dtype=DT)
            outs = [torch.empty(1, N, device=DEV, dtype=DT) for _ in nk]
            row = {"model": model, "K": K, "N": N, "bytes": K * N * 2}
            row["cublas_kn_s"] = per_call([lambda w=w, o=o: torch.addmm(b, x, w, out=o) for w, o in zip(kn, outs)])
            row["cublas_nk_s"] = per_call([lambda w=w, o=o: torch.addmm(b, x, w.t(), out=o) for w, o in zip(nk, outs)])
            tile = head_tile(K, N) if head else G.default_config(1, K, N, False)
            src = [w.t() for w in nk] if head else kn          # the tile kernel on the layout it had
            row["tile"] = tile.__dict__
            row["tile_s"] = per_call([lambda w=w, o=o: G.gemv(x, w, b, out=o, config=tile) for w, o in zip(src, outs)])
            row["rows"] = []
            for cfg in row_configs(K, N):
                try:
                    t = per_call([lambda w=w, o=o: G.gemv(x, w.t(), b, out=o, config=cfg) for w, o in zip(nk, outs)])
                except Exception as e:                       # noqa: BLE001 — a config that does not compile is data
                    row["rows"].append({"config": cfg.__dict__, "error": repr(e)[:200]})
                    continue
                row["rows"].append({"config": cfg.__dict__, "s": t})
            timed = [r for r in row["rows"] if "s" in r]
            top = min(timed, key=lambda r: r["s"])
            best[(K, N)] = G.RowsConfig(**top["config"])
            row["best_rows"] = top
            gb = lambda s: K * N * 2 / s / 1e9   # noqa: E731
            log(f"{model} {K}->{N}: cuBLAS kn {row['cublas_kn_s'] * 1e6:.1f} us ({gb(row['cublas_kn_s']):.0f} GB/s), "
                f"nk {row['cublas_nk_s'] * 1e6:.1f} us ({gb(row['cublas_nk_s']):.0f}), "
                + f"tile {row['tile_s'] * 1e6:.1f} us, "
                + f"rows best {top['s'] * 1e6:.1f} us ({gb(top['s']):.0f} GB/s) {top['config']}")
            RES["shapes"].append(row)
            del nk, kn, outs
            torch.cuda.empty_cache()
    return best


def chain_part(best):
    for model, shapes in SHAPES.items():
        L = LAYERS[model]
        (K1, N1), (K2, N2), (K3, N3), (K4, N4), (KL, NL) = shapes
        D = K1
        nk = [[torch.randn(n, k, device=DEV, dtype=DT) * 0.02 for k, n in shapes[:4]] for _ in range(L)]
        kn = [[w.t().contiguous() for w in layer] for layer in nk]
        bs = [torch.zeros(n, device=DEV, dtype=DT) for _, n in shapes[:4]]
        head = torch.randn(NL, KL, device=DEV, dtype=DT) * 0.02
        nbytes = sum(w.numel() * 2 for layer in nk for w in layer) + head.numel() * 2
        x0 = torch.randn(1, D, device=DEV, dtype=DT)

        def run(prod):
            def chain():
                x = x0
                for layer in range(L):
                    y = x
                    for j in range(4):
                        y = prod(layer, j, y)
                    x = y[:, :D]
                return prod(None, 4, x)
            return chain

        def cublas_kn(layer, j, y):
            if layer is None:
                return torch.mm(y, head.t())
            return torch.addmm(bs[j], y[:, :kn[layer][j].shape[0]], kn[layer][j])

        def cublas_nk(layer, j, y):
            if layer is None:
                return torch.mm(y, head.t())
            w = nk[layer][j]
            return torch.addmm(bs[j], y[:, :w.shape[1]], w.t())

        def tile(layer, j, y):
            if layer is None:
                return G.gemv(y, head.t(), config=head_tile(KL, NL))
            w = kn[layer][j]
            return G.gemv(y[:, :w.shape[0]], w, bs[j], config=G.default_config(1, w.shape[0], w.shape[1], False))

        def rows(layer, j, y):
            if layer is None:
                return G.gemv(y, head.t(), config=best[(KL, NL)])
            w = nk[layer][j].t()
            return G.gemv(y[:, :w.shape[0]], w, bs[j], config=best[(w.shape[0], w.shape[1])])

        rec = {"model": model, "bytes": nbytes}
        for name, prod in (("cublas_kn", cublas_kn), ("cublas_nk", cublas_nk), ("tile", tile), ("rows", rows)):
            rec[name + "_s"] = perf.captured_seconds([run(prod)], replays=15)
        y_ref, y_rows = run(cublas_kn)().float(), run(rows)().float()
        rec["rows_vs_cublas_max_rel"] = ((y_rows - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-6)).item()
        log(f"chain {model} M=1 ({nbytes / 1e9:.2f} GB): " + ", ".join(
            f"{n} {rec[n + '_s'] * 1e3:.3f} ms ({nbytes / rec[n + '_s'] / 1e9:.0f} GB/s)"
            for n in ("cublas_kn", "cublas_nk", "tile", "rows")) + f"; rel diff {rec['rows_vs_cublas_max_rel']:.3g}")
        RES["chain"].append(rec)
        del nk, kn, head
        torch.cuda.empty_cache()


def cublas_rows_part():
    for model, shapes in SHAPES.items():
        for K, N in shapes[:4]:
            w_nk = torch.randn(N, K, device=DEV, dtype=DT) * 0.02
            w_kn = w_nk.t().contiguous()
            b = torch.zeros(N, device=DEV, dtype=DT)
            for M in (8, 32, 1024, 8192):
                x = torch.randn(M, K, device=DEV, dtype=DT)
                reps = 20 if M <= 32 else 5
                row = {"model": model, "K": K, "N": N, "M": M}
                row["kn_s"] = per_call([lambda: torch.addmm(b, x, w_kn)] * reps)
                row["nk_s"] = per_call([lambda: torch.addmm(b, x, w_nk.t())] * reps)
                if N == 4 * K:
                    row["gelu_kn_s"] = per_call([lambda: torch._addmm_activation(b, x, w_kn, use_gelu=True)] * reps)
                    row["gelu_nk_s"] = per_call([lambda: torch._addmm_activation(b, x, w_nk.t(), use_gelu=True)] * reps)
                RES["cublas_rows"].append(row)
                log(f"cuBLAS {model} {K}->{N} M={M}: kn {row['kn_s'] * 1e6:.1f} us, nk {row['nk_s'] * 1e6:.1f} us"
                    + (f" | gelu kn {row['gelu_kn_s'] * 1e6:.1f}, nk {row['gelu_nk_s'] * 1e6:.1f}" if "gelu_kn_s" in row else ""))


def rows_m_part():
    """Several token rows (decode batches 2-16) on K-contiguous weights: cuBLAS, the row kernel
    (one multiply-and-sum pass a row), the tile kernel's default and its one-trip (PDL) tiles."""
    for model, shapes in SHAPES.items():
        for K, N in shapes:
            nk, b = weights(K, N)
            head = b is None
            for M in (2, 4, 8, 16):
                x = torch.randn(M, K, device=DEV, dtype=DT)
                outs = [torch.empty(M, N, device=DEV, dtype=DT) for _ in nk]
                row = {"model": model, "K": K, "N": N, "M": M}
                row["cublas_nk_s"] = cublas_nk_s(x, b, nk, outs)
                variants = {"rows": G.rows_config(K, N), "tile_default": G.default_config(M, K, N, True)}
                if not head:     # one trip a program: all its weights loaded before the PDL wait
                    variants["tile_pdl"] = G.GemvConfig(block_n=64, block_k=128, split=triton.cdiv(K, 128), use_dot=M > 1)
                else:
                    variants["tile_plan"] = head_tile(K, N)
                saved = G.ROWS_MAX_M
                G.ROWS_MAX_M = 16
                try:
                    for name, cfg in variants.items():
                        if cfg is None:
                            continue
                        try:
                            row[name + "_s"] = per_call([lambda w=w, o=o: G.gemv(x, w.t(), b, out=o, config=cfg)
                                                         for w, o in zip(nk, outs)])
                        except Exception as e:                # noqa: BLE001
                            row[name + "_error"] = repr(e)[:200]
                finally:
                    G.ROWS_MAX_M = saved
                RES["rows_m"].append(row)
                log(f"M={M} {model} {K}->{N}: " + ", ".join(f"{k[:-2]} {v * 1e6:.1f} us" for k, v in row.items()
                                                           if k.endswith("_s")))
            del nk
            torch.cuda.empty_cache()


def dot_configs(K: int, N: int) -> list[G.RowsConfig]:
    out = []
    for split in (1, 2, 4, 8):
        for bn in (16, 32):
            for warps in (4, 8):
                c = G.RowsConfig(block_n=bn, split=split, num_warps=warps, use_dot=True)
                kps = c.k_per_split(K)
                if (split == 1 or kps >= 256) and bn * triton.next_power_of_2(kps) <= 32768 and \
                        (split == 1 or triton.cdiv(N, bn) * (split // 2) < 600):
                    out.append(c)
    return out


#: SMs of the H200 the tile candidates are sized for: splits that bring a shape's grid to 1-2 waves
SMS = 132


def tile_block_configs(M: int, K: int, N: int) -> list[G.GemvConfig]:
    """The tile kernel with one block of token rows for all ``M`` (16-64: the weights are read once,
    where 16-row blocks read them ``M / 16`` times), deeper software pipelining, and K split so the
    grid fills the GPU once or twice."""
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    out = []
    for bn in (64, 128):
        for bk in (128,):
            for waves in (1, 2):
                split = max(1, min(K // bk, round(waves * SMS / triton.cdiv(N, bn))))
                for stages in (3, 4):
                    out.append(G.GemvConfig(block_n=bn, block_k=bk, split=split, num_warps=4, use_dot=True,
                                            block_m=block_m, num_stages=stages))
    return sorted(set(out), key=repr)


def rows_dot_part():
    """The row kernel on the tensor cores (``use_dot``) at 4-64 token rows against cuBLAS and the
    tile kernel (at 32 and 64 rows also in one block of all the rows, :func:`tile_block_configs`);
    the fastest per (shape, rows) goes into ``RES['table']`` (None: cuBLAS)."""
    table = {}
    for model, shapes in SHAPES.items():
        for K, N in shapes:
            nk, b = weights(K, N)
            for M in (4, 8, 16, 32, 64):
                x = torch.randn(M, K, device=DEV, dtype=DT)
                ref = x.float() @ nk[0].float().t() + (b.float() if b is not None else 0)
                outs = [torch.empty(M, N, device=DEV, dtype=DT) for _ in nk]
                row = {"model": model, "K": K, "N": N, "M": M, "ours": []}
                row["cublas_s"] = cublas_nk_s(x, b, nk, outs)
                cands = dot_configs(K, N) + [G.default_config(M, K, N, True)]
                if M >= 32:                                   # 16 rows: already one block
                    cands += tile_block_configs(M, K, N)
                if b is None:                                 # an LM head: bench_kernels.py's tiles for it
                    cands += HEAD_TILES
                best, best_t = None, row["cublas_s"]
                for cfg in cands:
                    try:
                        y = G.gemv(x, nk[0].t(), b, config=cfg).float()
                        err = (y - ref).abs().max().item()
                        if not err <= 2e-2 * ref.abs().max().item() + 1e-3:
                            row["ours"].append({"config": repr(cfg), "error": f"wrong: {err}"})
                            log(f"WRONG {model} {K}->{N} M={M} {cfg}: {err}")
                            continue
                        t = per_call([lambda w=w, o=o: G.gemv(x, w.t(), b, out=o, config=cfg) for w, o in zip(nk, outs)])
                    except Exception as e:                    # noqa: BLE001 — a config that does not compile is data
                        row["ours"].append({"config": repr(cfg), "error": repr(e)[:200]})
                        continue
                    row["ours"].append({"config": repr(cfg), "s": t, "max_err": err})
                    if t < best_t:
                        best, best_t = cfg, t
                row["best"], row["best_s"] = repr(best), best_t
                table[(K, N, True, M)] = best
                RES["rows_dot"].append(row)
                log(f"M={M} {model} {K}->{N}: cuBLAS {row['cublas_s'] * 1e6:.1f} us | best {best_t * 1e6:.1f} us {best}")
            del nk
            torch.cuda.empty_cache()
    RES["table"] = {repr(k): repr(v) for k, v in table.items()}
    return table


def engine_part(table):
    """The engine's decode rows (bench_engine.py, engine only) with the measured table in force."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_engine

    G.MEASURED.update(table)
    log("engine decode with the measured table: " + ", ".join(f"{k}: {v}" for k, v in table.items()))
    bench_engine.main(["--quick", "--systems", "engine", "--workloads", "decode", "--out", os.path.join(OUT, "engine")])


OUT = "."
PARTS = ("check", "shapes", "chain", "cublas_rows", "rows_m", "rows_dot", "engine")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    if not torch.cuda.is_available():
        print("probe_gemv_rows needs a CUDA GPU; nothing to do on this machine")
        return 0
    RES["device"] = torch.cuda.get_device_name()
    RES["versions"] = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    global OUT
    OUT = args.out
    best, table = None, {}
    for name, part in (("check", check), ("shapes", shapes_part), ("chain", lambda: chain_part(best)),
                       ("cublas_rows", cublas_rows_part), ("rows_m", rows_m_part), ("rows_dot", rows_dot_part),
                       ("engine", lambda: engine_part(table))):
        if name not in parts:
            continue
        try:
            got = part()
            best = got if name == "shapes" else best
            table = got if name == "rows_dot" else table
        except Exception as e:  # noqa: BLE001 — record and go on to the next part
            RES["errors"].append(f"{name}: {e!r}"[:500])
            log("ERROR", name, repr(e)[:500])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_gemv_rows.json"), "w") as f:
        json.dump(RES, f, indent=1, default=str)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
