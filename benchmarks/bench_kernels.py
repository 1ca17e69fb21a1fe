"""Fused kernels and decode GEMVs on one GPU: correctness first, then cuBLAS/torch vs ours.

    PYTHONPATH=$PWD python3 benchmarks/bench_kernels.py --out $OUT          # H200: under 3 minutes
    PYTHONPATH=$PWD python3 benchmarks/bench_kernels.py --smoke --out /tmp/k  # CPU, interpreter (sets it)

1. correctness: every GEMV shape of GPT-2 124M and XL at M = 1..8 and 32 (with and without bias,
   with GELU), the LM head, add+LayerNorm (plain, split-K partials, logit-row gather),
   embed+LayerNorm and bias+GELU against torch in fp32 — PASS/FAIL and the max error per case;
2. every GEMV shape at M = 1, 8, 32: cuBLAS (addmm, as the engine's reference path) vs each
   candidate launch shape of ours, time per call from a CUDA graph that runs the product on enough
   copies of the weight to miss in L2 (as in a real step), achieved GB/s; the best one per shape
   becomes the table (printed as ``MEASURED`` lines, and used below; these are for the Conv1D
   layout, N contiguous: since session 6 the engine stores its projections K-contiguous and
   triton_gemv.py's table comes from probe_gemv_rows.py);
3. the whole model's weight products back to back in one CUDA graph (48 x 4 + LM head for XL,
   12 x 4 + LM head for 124M, M = 1 and 8): cuBLAS vs the table;
4. add + LayerNorm fused vs torch's add then layer_norm (in a graph);
5. the engine's decode step (random weights, B1, context 512, whole-step graphs) with
   fused_kernels on vs off: tok/s (ledger), GPU time of one bucket-1 graph replay, CUDA kernels
   per step (torch.profiler over one replay, and over one eager forward), logits agreement.

Writes ``bench_kernels.json`` (device, versions, raw times) to ``--out``. One failing case prints
its error and the rest go on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"       # before triton is imported: kernels run on the CPU

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from course_lib import perf  # noqa: E402
from course_lib.engine import triton_gemv as G  # noqa: E402
from course_lib.engine.triton_fused import add_layernorm, bias_gelu, embed_layernorm  # noqa: E402

SHAPES = {   # (K, N, k_contiguous): the four products of a layer and the LM head (wte.T)
    "gpt2": [(768, 2304, False), (768, 768, False), (768, 3072, False), (3072, 768, False), (768, 50257, True)],
    "gpt2-xl": [(1600, 4800, False), (1600, 1600, False), (1600, 6400, False), (6400, 1600, False),
                (1600, 50257, True)],
}
LAYERS = {"gpt2": 12, "gpt2-xl": 48}
RESULT: dict = {"cases": [], "gemv": [], "model_replay": [], "add_layernorm": [], "engine": [], "errors": []}
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def guarded(name):
    def wrap(fn):
        def run(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:                      # one failing case must not stop the rest
                log(f"ERROR in {name} {a}: {type(e).__name__}: {e}")
                RESULT["errors"].append({"where": f"{name} {a}", "error": traceback.format_exc()})
                return None
        return run
    return wrap


def check(name, got, ref, rel=1e-2):
    err = (got.float() - ref.float()).abs().max().item()
    scale = max(ref.float().abs().max().item(), 1e-6)
    ok = err <= rel * scale
    log(f"{'PASS' if ok else 'FAIL'} {name}: max err {err:.3e} (scale {scale:.3e})")
    RESULT["cases"].append({"case": name, "ok": ok, "max_err": err, "scale": scale})
    return ok


# ----------------------------------------------------------------------------- 1. correctness
@guarded("gemv correctness")
def check_gemv(K, N, kc, M, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(K * 7 + N + M)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype)
    w = w.t() if kc else w.t().contiguous()                              # (K, N) either way
    b = None if kc else torch.randn(N, generator=g).to(device, dtype)
    ref = x.float() @ w.float() + (b.float() if b is not None else 0)
    cfg = G.plan_gemv(M, K, N, kc) or G.default_config(M, K, N, kc)
    check(f"gemv {K}->{N} M={M} {cfg}", G.gemv(x, w, b, config=cfg), ref)
    if not kc and M in (1, 8):
        check(f"gemv+gelu {K}->{N} M={M}", G.gemv(x, w, b, gelu=True, config=cfg), F.gelu(ref, approximate="tanh"))
        parts = G.gemv_partials(x, w, cfg)
        check(f"gemv partials {K}->{N} M={M} splits={parts.shape[0]}", parts.sum(0) + b.float(), ref)


@guarded("elementwise correctness")
def check_elementwise(D, rows, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(D + rows)
    ln = torch.nn.LayerNorm(D, device=device, dtype=dtype)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(D, generator=g)), ln.bias.copy_(torch.randn(D, generator=g))
    x = torch.randn(rows, D, generator=g).to(device, dtype)
    parts = torch.randn(3, rows, D, generator=g).to(device)
    db = torch.randn(D, generator=g).to(device, dtype)
    xr = (x.float() + parts.sum(0) + db.float()).to(dtype)
    x_new, h = add_layernorm(x, ln, parts, db)
    check(f"add_layernorm partials D={D} rows={rows}", x_new, xr)
    check(f"add_layernorm partials LN D={D} rows={rows}", h, F.layer_norm(xr.float(), (D,), ln.weight.float(), ln.bias.float()))
    d = torch.randn(rows, D, generator=g).to(device, dtype)
    x_new, h = add_layernorm(x, ln, d)
    check(f"add_layernorm D={D} rows={rows}", h, F.layer_norm((x + d).float(), (D,), ln.weight.float(), ln.bias.float()))
    sel = torch.tensor([rows - 1, 0], device=device)
    _, h = add_layernorm(x, ln, d, rows=sel)
    check(f"add_layernorm gather D={D}", h, F.layer_norm((x + d)[sel].float(), (D,), ln.weight.float(), ln.bias.float()))
    wte, wpe = torch.randn(50, D, generator=g).to(device, dtype), torch.randn(40, D, generator=g).to(device, dtype)
    ids, pos = torch.randint(0, 50, (rows,), generator=g).to(device), torch.randint(0, 40, (rows,), generator=g).to(device)
    x_e, h_e = embed_layernorm(ids, pos, wte, wpe, ln)
    check(f"embed_layernorm D={D} rows={rows}", h_e, F.layer_norm((wte[ids] + wpe[pos]).float(), (D,), ln.weight.float(), ln.bias.float()))
    y = torch.randn(rows, 4 * D, generator=g).to(device, dtype)
    b4 = torch.randn(4 * D, generator=g).to(device, dtype)
    check(f"bias_gelu N={4 * D} rows={rows}", bias_gelu(y, b4), F.gelu(y.float() + b4.float(), approximate="tanh"))


# ----------------------------------------------------------------------------- timing helpers
def replay_time(graph, reps=30) -> float:
    """Median seconds of one replay of an already captured CUDA graph (a graph cannot be replayed
    inside another capture, so the engine's own step graphs are timed this way)."""
    return perf.graph_replay_seconds(graph, reps)


def graph_time(fns, reps=20) -> float:
    """Median seconds of one replay of a CUDA graph that calls every fn in ``fns`` once."""
    return perf.captured_seconds(fns, reps)


def candidates(M, K, N, kc):
    base = G.default_config(M, K, N, kc)
    dot = M > 1
    s = base.split
    out = [base]
    for bn, bk, split, warps in [(64, 64, 1, 4), (32, 64, 1, 4), (128, 64, s, 8), (256, 64, s, 8),
                                 (64, 128, s, 4), (128, 128, max(1, s // 2), 8), (64, 64, 2 * s, 4),
                                 (32, 128, 1, 4)]:
        out.append(G.GemvConfig(block_n=bn, block_k=bk, split=split, num_warps=warps, use_dot=dot))
    if M == 1:
        out.append(G.GemvConfig(**{**base.__dict__, "use_dot": True}))
    seen, unique = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


@guarded("gemv timing")
def time_gemv(model, K, N, kc, M, device, dtype, budget_s):
    """cuBLAS vs our candidates for one shape; returns the best config (None: cuBLAS)."""
    nbytes = K * N * 2
    copies = max(1, min(128, (400 << 20) // nbytes))         # well past the 50 MB L2
    ws = [torch.randn(N, K, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
    ws = [w.t() if kc else w.t().contiguous() for w in ws]     # (K, N)
    bias = None if kc else torch.zeros(N, device=device, dtype=dtype)
    x = torch.randn(M, K, device=device, dtype=dtype)
    outs = [torch.empty(M, N, device=device, dtype=dtype) for _ in range(copies)]

    def cublas(w, o):
        return (lambda: torch.addmm(bias, x, w, out=o)) if bias is not None else (lambda: torch.mm(x, w, out=o))

    t_cublas = graph_time([cublas(w, o) for w, o in zip(ws, outs)]) / copies
    row = {"model": model, "K": K, "N": N, "k_contiguous": kc, "M": M, "bytes": nbytes,
           "cublas_s": t_cublas, "cublas_gbps": nbytes / t_cublas / 1e9, "ours": []}
    best, best_t = None, t_cublas
    ref = (x.float() @ ws[0].float())
    for cfg in candidates(M, K, N, kc):
        if time.perf_counter() - T0 > budget_s and cfg != candidates(M, K, N, kc)[0]:
            break                                              # out of sweep time: defaults only
        try:
            y = G.gemv(x, ws[0], bias, config=cfg)
            err = (y.float() - ref).abs().max().item()
            if not err <= 1e-2 * ref.abs().max().item() + 1e-3:
                row["ours"].append({"config": cfg.__dict__, "error": f"wrong: max err {err}"})
                continue
            t = graph_time([lambda w=w, o=o: G.gemv(x, w, bias, out=o, config=cfg) for w, o in zip(ws, outs)]) / copies
        except Exception as e:
            row["ours"].append({"config": cfg.__dict__, "error": f"{type(e).__name__}: {e}"})
            continue
        row["ours"].append({"config": cfg.__dict__, "s": t, "gbps": nbytes / t / 1e9})
        if t < best_t:
            best, best_t = cfg, t
    row["best"] = best.__dict__ if best is not None else "cublas"
    row["best_s"] = best_t
    default_t = next((o["s"] for o in row["ours"] if "s" in o), None)
    log(f"{model} {K:>5}->{N:<5} M={M:<2}: cuBLAS {t_cublas * 1e6:7.1f} us ({row['cublas_gbps']:5.0f} GB/s)"
        + (f" | default {default_t * 1e6:7.1f} us" if default_t else "")
        + f" | best {best_t * 1e6:7.1f} us ({nbytes / best_t / 1e9:5.0f} GB/s) {row['best']}")
    RESULT["gemv"].append(row)
    del ws, outs
    return best


@guarded("model replay")
def model_replay(model, M, table, device, dtype):
    """All of one token's weight products, back to back in one graph: cuBLAS vs the table."""
    layers = LAYERS[model]
    (k1, n1, _), (k2, n2, _), (k3, n3, _), (k4, n4, _), (kl, nl, _) = SHAPES[model]
    ws = [[torch.randn(k, n, device=device, dtype=dtype) * 0.02 for k, n in ((k1, n1), (k2, n2), (k3, n3), (k4, n4))]
          for _ in range(layers)]
    bs = [torch.zeros(n, device=device, dtype=dtype) for n in (n1, n2, n3, n4)]
    head = (torch.randn(nl, kl, device=device, dtype=dtype) * 0.02).t()
    xs = {k: torch.randn(M, k, device=device, dtype=dtype) for k in {k1, k2, k3, k4}}
    outs = {n: torch.empty(M, n, device=device, dtype=dtype) for n in {n1, n2, n3, n4, nl}}
    nbytes = layers * 2 * (k1 * n1 + k2 * n2 + k3 * n3 + k4 * n4) + 2 * kl * nl

    def ours(w, b, kc):
        cfg = table.get((w.shape[0], w.shape[1], kc, G.rows_bucket(M)), "default")
        if cfg == "default":
            cfg = G.default_config(M, w.shape[0], w.shape[1], kc)
        x, o = xs[w.shape[0]], outs[w.shape[1]]
        if cfg is None:
            return (lambda: torch.addmm(b, x, w, out=o)) if b is not None else (lambda: torch.mm(x, w, out=o))
        return lambda: G.gemv(x, w, b, out=o, config=cfg)

    cub = [lambda w=w, b=b: torch.addmm(b, xs[w.shape[0]], w, out=outs[w.shape[1]]) for layer in ws for w, b in zip(layer, bs)]
    cub.append(lambda: torch.mm(xs[kl], head, out=outs[nl]))
    mine = [ours(w, b, False) for layer in ws for w, b in zip(layer, bs)] + [ours(head, None, True)]
    t_c, t_o = graph_time(cub, reps=10), graph_time(mine, reps=10)
    row = {"model": model, "M": M, "bytes": nbytes, "cublas_s": t_c, "ours_s": t_o,
           "cublas_gbps": nbytes / t_c / 1e9, "ours_gbps": nbytes / t_o / 1e9}
    log(f"{model} M={M} all weight products in one graph: cuBLAS {t_c * 1e3:.3f} ms ({row['cublas_gbps']:.0f} GB/s, "
        f"<= {M / t_c:.0f} tok/s) | ours {t_o * 1e3:.3f} ms ({row['ours_gbps']:.0f} GB/s, <= {M / t_o:.0f} tok/s)")
    RESULT["model_replay"].append(row)
    del ws, head


@guarded("add_layernorm timing")
def time_add_layernorm(D, rows, device, dtype):
    ln = torch.nn.LayerNorm(D, device=device, dtype=dtype)
    reps = 50
    xs = [torch.randn(rows, D, device=device, dtype=dtype) for _ in range(reps)]
    d = torch.randn(rows, D, device=device, dtype=dtype)
    bias = torch.randn(D, device=device, dtype=dtype)

    def torch_path(x):
        return lambda: F.layer_norm(x + (d + bias), (D,), ln.weight, ln.bias)   # bias add (addmm's), add, LN

    t_torch = graph_time([torch_path(x) for x in xs]) / reps
    t_fused = graph_time([lambda x=x: add_layernorm(x, ln, d, bias) for x in xs]) / reps
    row = {"D": D, "rows": rows, "torch_s": t_torch, "fused_s": t_fused}
    log(f"add+LayerNorm D={D} rows={rows}: torch {t_torch * 1e6:.2f} us | fused {t_fused * 1e6:.2f} us")
    RESULT["add_layernorm"].append(row)


# ----------------------------------------------------------------------------- 5. the engine
def count_kernels(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@guarded("engine decode")
def engine_decode(model_name, fused, model, prompts, device, dtype, logits_store):
    from course_lib.engine import LLM, SamplingParams
    from course_lib.engine import benchmark as B

    llm = LLM(model, device=device, dtype=dtype, num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=1024,
              fused_kernels=fused)
    runner = llm.engine.runner
    first = []
    original = runner.execute

    def recording(flat):
        logits, greedy = original(flat)
        if not first:
            first.append(logits.float().clone())
        return logits, greedy

    runner.execute = recording
    tokens = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))]
    runner.execute = original
    logits_store[fused] = (first[0], tokens)
    d = B.engine_decode(llm, batch=1, context=512, steps=64)
    graph, _ = runner.step_graphs.graphs[1]
    step_s = replay_time(graph)
    kernels_graph = count_kernels(graph.replay)
    batch = runner.step_graphs.static_batch(runner.step_graphs.buffers[1])
    kernels_eager = count_kernels(lambda: runner.forward(batch))
    row = {"model": model_name, "fused": fused, "tokens_per_s": d["tokens_per_s"], "graph_replay_s": step_s,
           "kernels_per_step_graph": kernels_graph, "kernels_per_step_eager": kernels_eager,
           "plans": {str(k): (v.__dict__ if v is not None else "cublas") for k, v in
                     (runner.fused._plans.items() if runner.fused is not None else [])}}
    log(f"engine {model_name} fused={fused}: decode B1 ctx512 {d['tokens_per_s']:.0f} tok/s | bucket-1 graph replay "
        f"{step_s * 1e3:.3f} ms | CUDA kernels per step: {kernels_graph} (graph replay), {kernels_eager} (eager forward)")
    RESULT["engine"].append(row)
    llm.shutdown() if hasattr(llm, "shutdown") else None
    del llm, runner, graph
    gc.collect()
    torch.cuda.empty_cache()


def engine_section(model_name, device, dtype):
    from course_lib.engine import benchmark as B

    model = B.random_gpt(model_name, device, dtype, seed=0)
    prompts = B.random_prompts(4, (20, 60), model.config.vocab_size, seed=3)
    store = {}
    for fused in (False, True):
        engine_decode(model_name, fused, model, prompts, device, dtype, store)
    if len(store) == 2:
        (l0, t0), (l1, t1) = store[False], store[True]
        err = (l0 - l1).abs().max().item()
        same = sum(a == b for a, b in zip(t0, t1))
        ok = err <= 0.05 * l0.abs().max().item()
        log(f"{'PASS' if ok else 'FAIL'} engine {model_name} fused vs reference: first-step logits max diff {err:.3e} "
            f"(scale {l0.abs().max().item():.2f}); greedy outputs identical for {same}/{len(t0)} prompts (bf16: may differ)")
        RESULT["cases"].append({"case": f"engine logits {model_name}", "ok": ok, "max_err": err,
                                "same_outputs": same, "prompts": len(t0)})
    del model
    gc.collect()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny shapes: correctness only")
    p.add_argument("--sweep-budget", type=float, default=75.0, help="seconds (from the start) after which the sweep tries defaults only")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not a.smoke
    device = "cuda" if cuda else "cpu"
    RESULT.update(device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
                  torch=torch.__version__, triton=triton.__version__)
    log("device", RESULT["device"], "torch", torch.__version__, "triton", triton.__version__)

    if not cuda:      # the interpreter: small shapes, fp32 and bf16
        for dtype in (torch.float32, torch.bfloat16):
            for K, N, kc in [(96, 80, False), (200, 130, False), (64, 150, True)]:
                for M in (1, 3, 8):
                    check_gemv(K, N, kc, M, device, dtype)
            check_elementwise(48, 5, device, dtype)
    else:
        dtype = torch.bfloat16
        for model in SHAPES:                                           # 1. correctness
            for K, N, kc in SHAPES[model]:
                for M in (1, 2, 3, 4, 8, 32):
                    check_gemv(K, N, kc, M, device, dtype)
        for D in (768, 1600):
            for rows in (1, 8, 300):
                check_elementwise(D, rows, device, dtype)
        table = {}
        for model in SHAPES:                                           # 2. per shape
            for K, N, kc in SHAPES[model]:
                for M in (1, 8, 32):
                    best = time_gemv(model, K, N, kc, M, device, dtype, a.sweep_budget)
                    last = RESULT["gemv"][-1] if RESULT["gemv"] else {}
                    if (last.get("K"), last.get("N"), last.get("M")) == (K, N, M):
                        table[(K, N, kc, G.rows_bucket(M))] = best
        RESULT["table"] = {str(k): (v.__dict__ if v is not None else None) for k, v in table.items()}
        print("\n# measured table for course_lib/engine/triton_gemv.py (paste into MEASURED):")
        for k, v in table.items():
            print(f"    {k}: {'None' if v is None else 'GemvConfig(' + ', '.join(f'{n}={x!r}' for n, x in v.__dict__.items()) + ')'},")
        for model in SHAPES:                                           # 3. whole model
            for M in (1, 8):
                model_replay(model, M, table, device, dtype)
                gc.collect()
                torch.cuda.empty_cache()
        for D in (768, 1600):                                          # 4. add + LN
            for rows in (1, 8, 512):
                time_add_layernorm(D, rows, device, dtype)
        G.MEASURED.update(table)                                       # 5. the engine, with the measured table
        for model in ("gpt2", "gpt2-xl"):
            engine_section(model, device, dtype)

    fails = [c["case"] for c in RESULT["cases"] if not c["ok"]]
    RESULT["summary"] = {"cases": len(RESULT["cases"]), "failed": fails, "errors": len(RESULT["errors"]),
                         "seconds": time.perf_counter() - T0}
    (out / "bench_kernels.json").write_text(json.dumps(RESULT, indent=1, default=str))
    log(f"{len(RESULT['cases']) - len(fails)}/{len(RESULT['cases'])} correctness cases PASS, {len(RESULT['errors'])} errors;"
        f" wrote {out / 'bench_kernels.json'}")
    return 0 if not fails and not RESULT["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
