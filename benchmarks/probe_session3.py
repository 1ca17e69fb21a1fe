"""GPU probes that decided the PDL, GELU-epilogue and tile-size changes (benchmarks/NOTES.md, session 3).

    python3 benchmarks/probe_session3.py --out probe.json --parts e3,e2,e4,e1   # kernels (~2 min)
    python3 benchmarks/probe_session3.py --out probe.json                        # engine variants (~2.5 min)

Needs CUDA (PDL: compute capability 9.0). The JSON committed from it was measured with an earlier
revision of this file, whose E3 ran a prototype of the one-trip GEMV written here (the kernel that
became triton_gemv's ``pdl_config`` path) and whose replays were timed back to back as one mean;
this revision calls course_lib's GEMV and perf.captured_seconds / graph_replay_seconds (a median of
single replays) instead, and has not been rerun. Since session 6 the engine's decode GEMVs are
triton_gemv's row kernel on K-contiguous weights (benchmarks/probe_gemv_rows.py); the
``pdl_config`` path and ``PDL_MAX_BYTES`` it measured are gone, so P2's variants now differ only in
PDL on or off.

E1 prefill attention: the unified kernel's tile configs (BLOCK_M, BLOCK_N, warps, stages) vs SDPA at B1/B8 x 1024.
E2 cublasLt bias+GELU epilogue (torch._addmm_activation) vs mm + our bias_gelu.
E3 PDL GEMV chains: all XL weight products of one token in one graph, cuBLAS vs one-shot
   Triton GEMVs launched with programmatic dependent launch (weights loaded before gdc_wait).
E4 engine decode: step time vs back-to-back replay of the step graph (GPU floor).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib import perf  # noqa: E402
from course_lib.engine import pdl  # noqa: E402
from course_lib.engine.triton_gemv import GemvConfig, gemv  # noqa: E402

RES = {}


def e1():
    from course_lib.engine.attention_tiles import build_tiles
    from course_lib.engine.triton_unified import unified_attention
    dev, dt, bs, T, Dh = "cuda", torch.bfloat16, 16, 1024, 64
    out = []
    for H, B in ((12, 8), (25, 1), (25, 8)):
        N = B * T
        q, k, v = (torch.randn(N, H, Dh, device=dev, dtype=dt) for _ in range(3))
        blocks = N // bs + 1
        k_pool = torch.zeros(blocks, bs, H, Dh, device=dev, dtype=dt)
        v_pool = torch.zeros_like(k_pool)
        k_pool.view(-1, H, Dh)[bs:] = k
        v_pool.view(-1, H, Dh)[bs:] = v
        tables = (torch.arange(N // bs, device=dev, dtype=torch.long).view(B, -1) + 1)
        lens = torch.full((B,), T, device=dev, dtype=torch.long)
        qs = [i * T for i in range(B + 1)]
        flops = 4 * B * H * Dh * T * T / 2
        dense = [t.view(B, T, H, Dh).transpose(1, 2) for t in (q, k, v)]
        ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(*dense, is_causal=True), return_mode="median")
        rec = {"H": H, "B": B, "sdpa_us": ms * 1e3, "sdpa_tflops": flops / ms / 1e9, "configs": []}
        ref = F.scaled_dot_product_attention(*dense, is_causal=True).transpose(1, 2).reshape(N, H, Dh)
        qs_d = torch.tensor(qs, device=dev, dtype=torch.long)
        for bm, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
            seq, row = build_tiles(qs, [T] * B, bm)
            ts = torch.tensor(seq, device=dev, dtype=torch.long)
            tr = torch.tensor(row, device=dev, dtype=torch.long)
            cnt = torch.tensor([len(seq)], device=dev, dtype=torch.long)
            fn = lambda: unified_attention(q, k_pool, v_pool, tables, lens, qs_d, ts, tr, cnt, len(seq), bm,  # noqa: E731
                                           block_n=bn, num_warps=w, num_stages=st)
            try:
                o = fn()
                err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                ms = triton.testing.do_bench(fn, return_mode="median")
            except Exception as e:
                rec["configs"].append({"bm": bm, "bn": bn, "w": w, "st": st, "error": type(e).__name__})
                continue
            rec["configs"].append({"bm": bm, "bn": bn, "w": w, "st": st, "us": ms * 1e3,
                                   "tflops": flops / ms / 1e9, "err": err})
        good = sorted([c for c in rec["configs"] if "us" in c], key=lambda c: c["us"])
        print(f"E1 H={H} B={B}: SDPA {rec['sdpa_us']:.1f} us; best {good[0]}; "
              f"current {[c for c in good if (c['bm'], c['bn'], c['w'], c['st']) == (64, 64, 4, 2)]}", flush=True)
        out.append(rec)
    RES["e1"] = out


def e2():
    from course_lib.engine.triton_fused import bias_gelu
    dev = "cuda"
    out = []
    for K, Nn in ((768, 3072), (1600, 6400)):
        w = torch.randn(K, Nn, device=dev, dtype=torch.bfloat16) * 0.02
        b = torch.randn(Nn, device=dev, dtype=torch.bfloat16) * 0.02
        for M in (1, 8, 32, 1024, 8192):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ref = F.gelu(x.float() @ w.float() + b.float(), approximate="tanh")
            a = torch._addmm_activation(b, x, w, use_gelu=True)
            c = bias_gelu(torch.mm(x, w), b)
            err_a = ((a.float() - ref).abs().max()).item()
            err_c = ((c.float() - ref).abs().max()).item()
            t_a = triton.testing.do_bench(lambda: torch._addmm_activation(b, x, w, use_gelu=True), return_mode="median")
            t_c = triton.testing.do_bench(lambda: bias_gelu(torch.mm(x, w), b), return_mode="median")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                torch._addmm_activation(b, x, w, use_gelu=True)
                torch.cuda.synchronize()
            kern = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            r = {"K": K, "N": Nn, "M": M, "lt_us": t_a * 1e3, "mm_bias_gelu_us": t_c * 1e3, "err_lt": err_a,
                 "err_ours": err_c, "lt_kernels": kern}
            print("E2", r, flush=True)
            out.append(r)
    RES["e2"] = out


def e3():
    dev, dt = "cuda", torch.bfloat16
    out = []
    for name, D, L in (("gpt2-xl", 1600, 48), ("gpt2", 768, 12)):
        F4 = 4 * D
        shapes = [(D, 3 * D), (D, D), (D, F4), (F4, D)]
        Ws = [[torch.randn(k, n, device=dev, dtype=dt) * 0.02 for k, n in shapes] for _ in range(L)]
        nbytes = sum(w.numel() * 2 for ws in Ws for w in ws)
        x0 = torch.randn(1, D, device=dev, dtype=dt)

        def chain_cublas():
            x = x0
            for ws in Ws:
                y = torch.mm(x, ws[0])[:, :D]
                y = torch.mm(y, ws[1])
                y = torch.mm(y, ws[2])
                x = torch.mm(y, ws[3])
            return x

        def make_chain(bn, bk, warps):
            """Every product as one-trip tiles of ours (partials, then a reduce): course_lib's GEMV."""
            def chain():
                x = x0
                for ws in Ws:
                    y = x
                    for w in ws:
                        K = w.shape[0]
                        config = GemvConfig(block_n=bn, block_k=bk, split=triton.cdiv(K, bk), num_warps=warps)
                        y = gemv(y[:, :K], w, config=config)
                    x = y[:, :D]
                return x
            return chain

        def graph_time(fn):
            return perf.captured_seconds([fn], replays=15) * 1e3

        rec = {"model": name, "bytes": nbytes, "cublas_ms": graph_time(chain_cublas), "variants": []}
        print(f"E3 {name}: cuBLAS chain {rec['cublas_ms']:.3f} ms ({nbytes / rec['cublas_ms'] / 1e9:.0f} GB/s)", flush=True)
        # correctness of one product, PDL on
        w = Ws[0][0]
        o = gemv(x0, w, config=GemvConfig(block_n=128, block_k=64, split=triton.cdiv(w.shape[0], 64)))
        rec["err"] = (o.float() - (x0.float() @ w.float())).abs().max().item()
        for bn, bk, warps in ((128, 64, 4), (64, 128, 4), (128, 128, 4), (256, 64, 4), (128, 32, 4), (64, 64, 2)):
            for gdc in (False, True):
                pdl.ENABLED = gdc
                try:
                    ms = graph_time(make_chain(bn, bk, warps))
                except Exception as e:
                    rec["variants"].append({"bn": bn, "bk": bk, "warps": warps, "gdc": gdc, "error": repr(e)[:300]})
                    print("E3 error", bn, bk, gdc, repr(e)[:300], flush=True)
                    continue
                finally:
                    pdl.ENABLED = True
                rec["variants"].append({"bn": bn, "bk": bk, "warps": warps, "gdc": gdc, "ms": ms,
                                        "gbps": nbytes / ms / 1e6})
                print(f"E3 {name} bn={bn} bk={bk} w={warps} gdc={gdc}: {ms:.3f} ms ({nbytes / ms / 1e6:.0f} GB/s)",
                      flush=True)
        out.append(rec)
        del Ws
        torch.cuda.empty_cache()
    RES["e3"] = out


def e4():
    from course_lib.engine import LLM, SamplingParams
    from course_lib.engine import benchmark as B
    out = []
    for shape in ("gpt2", "gpt2-xl"):
        model = B.random_gpt(shape, "cuda", torch.bfloat16)
        llm = LLM(model, max_num_seqs=64, max_num_batched_tokens=8192)
        for batch in (1, 32):
            r = B.engine_decode(llm, batch, 512, steps=64)
            replay_ms = _replay_ms(llm.engine.runner.step_graphs.graphs[batch][0], 100)
            rec = {"model": shape, "batch": batch, "step_ms": batch / r["tokens_per_s"] * 1e3,
                   "replay_ms": replay_ms}
            print("E4", rec, flush=True)
            out.append(rec)
        # prefill B8 x 1024: whole generate vs graph replay of the 8192 bucket
        r = B.engine_prefill(llm, 8, 1024)
        rec = {"model": shape, "prefill_B8_generate_ms": r["seconds"] * 1e3,
               "replay_8192_ms": _replay_ms(llm.engine.runner.step_graphs.graphs[8192][0], 10)}
        print("E4", rec, flush=True)
        out.append(rec)
        del llm, model
        torch.cuda.empty_cache()
    RES["e4"] = out


# ---------------------------------------------------------------------------------- second round
def p1():
    """cuBLASLt's GELU epilogue: tanh or erf? fp32, TF32 off."""
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.randn(64, 256, device="cuda") * 2
    w = torch.randn(256, 512, device="cuda") / 16
    b = torch.randn(512, device="cuda")
    a = torch._addmm_activation(b, x, w, use_gelu=True)
    y = x @ w + b
    RES["p1"] = {"vs_tanh": (a - F.gelu(y, approximate="tanh")).abs().max().item(),
                 "vs_erf": (a - F.gelu(y)).abs().max().item()}
    print("P1", RES["p1"], flush=True)


def _replay_ms(graph, reps):
    return perf.graph_replay_seconds(graph, reps) * 1e3


def p2():
    from course_lib.engine import LLM, SamplingParams
    from course_lib.engine import benchmark as B
    from course_lib.engine import triton_gemv
    out = []
    variants = {"pdl_off": (False, 64 << 20), "pdl_all_ours": (True, 64 << 20), "pdl_cublas_proj": (True, 0),
                "pdl_ours_le8MB": (True, 8 << 20)}
    for shape in ("gpt2", "gpt2-xl"):
        model = B.random_gpt(shape, "cuda", torch.bfloat16)
        ref_tokens = None
        for name, (on, max_bytes) in variants.items():
            if shape == "gpt2" and name == "pdl_ours_le8MB":
                continue
            pdl.ENABLED = on
            triton_gemv.PDL_MAX_BYTES = max_bytes
            t = time.time()
            llm = LLM(model, max_num_seqs=64, max_num_batched_tokens=8192)
            build_s = time.time() - t
            graphs = llm.engine.runner.step_graphs.graphs
            rec = {"model": shape, "variant": name, "build_s": build_s}
            for bucket in (1, 8, 32, 1024, 8192):
                rec[f"replay_ms_{bucket}"] = _replay_ms(graphs[bucket][0], 100 if bucket <= 32 else 10)
            for batch in (1, 32):
                r = B.engine_decode(llm, batch, 512, steps=64)
                rec[f"decode_B{batch}_tok_s"] = r["tokens_per_s"]
            r = B.engine_prefill(llm, 1, 1024)
            rec["prefill_B1_ms"] = r["seconds"] * 1e3
            r = B.engine_prefill(llm, 8, 1024)
            rec["prefill_B8_ms"] = r["seconds"] * 1e3
            prompts = B.random_prompts(4, (20, 60), 50257, seed=5)
            outs = llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
            toks = [o.token_ids for o in outs]
            if ref_tokens is None:
                ref_tokens = toks
            rec["greedy_same_as_first"] = sum(a == b for a, b in zip(toks, ref_tokens))
            rec["greedy_first_diff"] = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                                        for a, b in zip(toks, ref_tokens)]
            print("P2", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)
            out.append(rec)
            llm.shutdown()
            del llm
            torch.cuda.empty_cache()
        del model
    pdl.ENABLED = True
    triton_gemv.PDL_MAX_BYTES = 64 << 20
    RES["p2"] = out


def p3():
    """Host profile of the engine: 124M decode B1 and prefill B8 x 1024."""
    import cProfile
    import io
    import pstats
    from course_lib.engine import LLM, SamplingParams
    from course_lib.engine import benchmark as B
    model = B.random_gpt("gpt2", "cuda", torch.bfloat16)
    llm = LLM(model, max_num_seqs=64, max_num_batched_tokens=8192)
    B.engine_decode(llm, 1, 512, steps=16)
    res = {}
    for name, fn in (("decode_B1", lambda: llm.generate(B.random_prompts(1, 512, 50257, seed=77),
                                                         SamplingParams(max_tokens=200, ignore_eos=True))),
                     ("prefill_B8", lambda: llm.generate(B.random_prompts(8, 1024, 50257, seed=78),
                                                          SamplingParams(max_tokens=1, ignore_eos=True))),
                     ("decode_B32", lambda: llm.generate(B.random_prompts(32, 512, 50257, seed=79),
                                                          SamplingParams(max_tokens=100, ignore_eos=True)))):
        fn()
        pr = cProfile.Profile()
        t = time.perf_counter()
        pr.enable()
        fn()
        pr.disable()
        wall = time.perf_counter() - t
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
        res[name] = {"wall_s": wall, "profile": s.getvalue()}
        print(f"P3 {name} wall {wall * 1e3:.1f} ms\n" + s.getvalue()[:6000], flush=True)
    RES["p3"] = res


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="p1,p2,p3")
    a = p.parse_args()
    for part in a.parts.split(","):
        t = time.time()
        try:
            globals()[part]()
        except Exception as e:
            import traceback
            traceback.print_exc()
            RES[part + "_error"] = repr(e)
        print(f"{part}: {time.time() - t:.1f} s", flush=True)
        Path(a.out).write_text(json.dumps(RES, indent=1))
