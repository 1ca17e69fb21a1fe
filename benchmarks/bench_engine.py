"""The engine beside HF transformers, on one GPU, in one run.

Measures, with the same random weights for every system:
* ceilings: bf16 matmul 8192^3 (TFLOP/s) and a 1 GiB device-to-device copy (GB/s, read + write);
* prefill tok/s and MFU (B = 1 and 8, T = 1024) and decode tok/s and MBU (B = 1 and 32, context
  512) for transformers' ``generate`` (attn_implementation="sdpa"), for course_lib.engine, and for
  two plain-PyTorch peers (benchmarks/peers.py, the gpt-fast recipe: static KV cache, one CUDA
  graph a decode step; "torch-graph" eager inside the graph, "torch-compile" compiled with
  ``fullgraph=True`` first, its compile seconds recorded). Without CUDA the peers run eagerly.
  Engine rows carry ``vs_transformers`` and ``vs_torch_compile`` (tok/s ratios);
* a serving workload (256 requests, prompt and output lengths uniform in [100, 1024], seeded, EOS
  ignored) in output tok/s for transformers' continuous batching (``init_continuous_batching``,
  attn_implementation="paged|sdpa", per-request max_new_tokens) and for the engine.

Writes benchmarks/results/<date>_<device>.json (or --out DIR), prints a markdown table, and
draws a bar chart when matplotlib is there. A peer call that fails is recorded with its
error string instead of stopping the run.

    python benchmarks/bench_engine.py                       # everything (GPU, ~5-8 minutes)
    python benchmarks/bench_engine.py --quick               # fewer requests and steps
    python benchmarks/bench_engine.py --models gpt2 --systems engine --workloads decode
    python benchmarks/bench_engine.py --smoke --out /tmp/b  # CPU, tiny shapes, seconds (CI)
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib import checkpoint  # noqa: E402
from course_lib.engine import LLM  # noqa: E402
from course_lib import perf  # noqa: E402
from course_lib.engine import benchmark as B  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from peers import StaticCacheGPT, compile_timed  # noqa: E402

#: the plain-PyTorch peers (benchmarks/peers.py): CUDA graph per decode step, optionally compiled first
PEERS = {"torch-graph": False, "torch-compile": True}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ HF transformers, the peer
def hf_load(directory, attn, device, dtype):
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


def hf_generate_time(model, ids, new_tokens) -> float:
    perf.synchronize(ids.device)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    perf.synchronize(ids.device)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - t


def hf_prefill(model, config, batch, T, device, repeats=3) -> float:
    ids = torch.tensor(B.random_prompts(batch, T, config.vocab_size, seed=7), device=device)
    hf_generate_time(model, ids, 1)                                        # warm up
    return batch * T / min(hf_generate_time(model, ids, 1) for _ in range(repeats))


def hf_decode(model, config, batch, context, steps, device) -> tuple[float, float]:
    ids = torch.tensor(B.random_prompts(batch, context, config.vocab_size, seed=8), device=device)
    hf_generate_time(model, ids, 2)                                        # warm up
    t1 = min(hf_generate_time(model, ids, 1) for _ in range(2))
    tn = hf_generate_time(model, ids, steps + 1)
    secs = max(tn - t1, 1e-9)
    return batch * steps / secs, secs


def hf_serving(model, prompts, output_lens, timeout_s) -> float:
    """transformers' continuous batching: a manager thread, one add_request per prompt."""
    from transformers import GenerationConfig

    def run(ps, outs):
        cfg = GenerationConfig(do_sample=False, max_new_tokens=max(outs), eos_token_id=-1, pad_token_id=0)
        manager = model.init_continuous_batching(generation_config=cfg)
        manager.start()
        try:
            t = time.perf_counter()
            for i, (p, m) in enumerate(zip(ps, outs)):
                manager.add_request(p, request_id=f"r{i}", max_new_tokens=m)
            done, produced = set(), 0
            while len(done) < len(ps):
                if time.perf_counter() - t > timeout_s:
                    raise TimeoutError(f"continuous batching did not finish {len(ps)} requests in {timeout_s} s "
                                       f"({len(done)} done)")
                r = manager.get_result(timeout=1)
                if r is None:
                    if not manager.is_running():
                        raise RuntimeError("the continuous batching thread stopped")
                    continue
                if r.is_finished() and r.request_id not in done:
                    if r.error:
                        raise RuntimeError(f"request {r.request_id} failed: {r.error}")
                    done.add(r.request_id)
                    produced += len(r.generated_tokens)
            secs = time.perf_counter() - t
        finally:
            manager.stop(block=True, timeout=30)
        return produced, secs

    run(prompts[:4], [8] * 4)                                              # warm up
    produced, secs = run(prompts, output_lens)
    if produced != sum(output_lens):
        log(f"  note: HF produced {produced} tokens, {sum(output_lens)} asked")
    return produced / secs


# ------------------------------------------------------------------ plain PyTorch, the gpt-fast recipe
def peer_prefill(model, cfg, batch, T, compile, device, repeats=3) -> tuple[float, float, dict]:
    """Best-of-``repeats`` seconds of one prefill of (batch, T) random prompts, compile seconds, mode."""
    peer = StaticCacheGPT(model, batch, T + 1, compile=compile)
    ids = torch.tensor(B.random_prompts(batch, T, cfg.vocab_size, seed=7), device=device)
    compile_s = compile_timed(peer, ids)                                   # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeats):
        perf.synchronize(device)
        t = time.perf_counter()
        peer.prefill(ids)
        perf.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best, compile_s if compile else None, {"compiled": compile, "cuda_graph": False}


def peer_decode(model, cfg, batch, context, steps, compile, device) -> tuple[float, float, dict]:
    """Seconds of ``steps`` decode steps after a prompt of ``context`` (best of 2), compile seconds, mode."""
    peer = StaticCacheGPT(model, batch, context + steps + 2, compile=compile)
    setup_s = peer.capture()                                               # compile, warm up, capture
    ids = torch.tensor(B.random_prompts(batch, context, cfg.vocab_size, seed=8), device=device)
    best = float("inf")
    for _ in range(2):
        peer.prefill(ids, compiled=False)                                  # fills the cache; not timed
        perf.synchronize(device)
        t = time.perf_counter()
        for _ in range(steps):
            peer.step()
        perf.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best, setup_s if compile else None, {"compiled": compile, "cuda_graph": peer.graphs}


# ------------------------------------------------------------------ one model, every system
def run_model(shape, args, device, dtype, peaks, runs):
    log(f"== {shape}: random weights")
    model = B.random_gpt(shape, device, dtype, seed=0)
    cfg = model.config
    elem = torch.empty((), dtype=dtype).element_size()
    T = min(args.prompt_len, cfg.n_positions - 1)
    ctx = min(args.context, cfg.n_positions - args.decode_steps - 2)
    hi = min(args.serving_max_len, cfg.n_positions // 2)
    lo = min(args.serving_min_len, hi)
    prompts, outs = B.serving_workload(args.num_requests, lo, hi, cfg.vocab_size, seed=args.seed)

    def record(system, workload, batch, prompt_len, context, tokens_per_s, mfu=None, mbu=None, error=None, **extra):
        row = {"system": system, "model": shape, "workload": workload, "batch": batch, "prompt_len": prompt_len,
               "context": context, "tokens_per_s": tokens_per_s, "mfu": mfu, "mbu": mbu}
        if error:
            row["error"] = error
        row.update(extra)
        runs.append(row)
        shown = f"{tokens_per_s:,.0f} tok/s" if tokens_per_s else f"ERROR {error}"
        log(f"  {system:12s} {workload:8s} B={batch:<4d} {shown}")

    def attempt(system, workload, batch, prompt_len, context, fn):
        try:
            fn()
        except Exception as e:                            # the peer's API moves: record, go on
            msg = f"{type(e).__name__}: {e}"[:500]
            log(traceback.format_exc(limit=3))
            record(system, workload, batch, prompt_len, context, None, error=msg)

    with tempfile.TemporaryDirectory() as tmp:
        if "hf" in args.systems or "hf-cb" in args.systems:
            checkpoint.save(model, tmp)                   # the peer loads the very same weights

        if "hf" in args.systems:
            try:
                hf = hf_load(tmp, "sdpa", device, dtype)
            except Exception as e:
                hf, err = None, f"{type(e).__name__}: {e}"[:500]
                record("hf-generate", "load", 0, 0, 0, None, error=err)
            if hf is not None:
                if "prefill" in args.workloads:
                    for b in args.prefill_batches:
                        def f(b=b):
                            tps = hf_prefill(hf, cfg, b, T, device)
                            secs = b * T / tps
                            record("hf-generate", "prefill", b, T, T, tps,
                                   **B.formula_rates(cfg, "prefill", b, T, T, secs, 1, elem, peaks))
                        attempt("hf-generate", "prefill", b, T, T, f)
                if "decode" in args.workloads:
                    for b in args.decode_batches:
                        def f(b=b):
                            tps, secs = hf_decode(hf, cfg, b, ctx, args.decode_steps, device)
                            record("hf-generate", "decode", b, ctx, ctx, tps,
                                   **B.formula_rates(cfg, "decode", b, ctx, ctx, secs, args.decode_steps, elem, peaks))
                        attempt("hf-generate", "decode", b, ctx, ctx, f)
                del hf
                free_memory()

        if "hf-cb" in args.systems and "serving" in args.workloads and shape in args.serving_models:
            def f():
                cb = hf_load(tmp, "paged|sdpa", device, dtype)
                try:
                    tps = hf_serving(cb, prompts, outs, args.hf_timeout)
                finally:
                    del cb
                    free_memory()
                record("hf-cb", "serving", args.num_requests, None, None, tps)
            attempt("hf-cb", "serving", args.num_requests, None, None, f)

    for system, compiled in PEERS.items():
        if system not in args.systems:
            continue
        compiled = compiled and device.type == "cuda"                     # on CPU the peers run eagerly
        if "prefill" in args.workloads:
            for b in args.prefill_batches:
                def f(b=b):
                    secs, compile_s, mode = peer_prefill(model, cfg, b, T, compiled, device)
                    record(system, "prefill", b, T, T, b * T / secs, compile_s=compile_s, **mode,
                           **B.formula_rates(cfg, "prefill", b, T, T, secs, 1, elem, peaks))
                attempt(system, "prefill", b, T, T, f)
                free_memory()
        if "decode" in args.workloads:
            for b in args.decode_batches:
                def f(b=b):
                    secs, compile_s, mode = peer_decode(model, cfg, b, ctx, args.decode_steps, compiled, device)
                    record(system, "decode", b, ctx, ctx, b * args.decode_steps / secs, compile_s=compile_s, **mode,
                           **B.formula_rates(cfg, "decode", b, ctx, ctx, secs, args.decode_steps, elem, peaks))
                attempt(system, "decode", b, ctx, ctx, f)
                free_memory()
        if compiled:
            torch._dynamo.reset()                                          # drop the compiled code and its graphs

    if "engine" in args.systems:
        for tp in args.tensor_parallel_size:
            run_engine(model, shape, args, device, dtype, peaks, prompts, outs, T, ctx, tp, record)
            free_memory()
    del model
    free_memory()


def allreduce_ms_per_step(llm, batch: int, context: int) -> float | None:
    """GPU milliseconds of rank 0's all-reduce kernels in one decode step (torch.profiler over a few
    steps of a fresh decode batch); None on CPU or with one rank."""
    if llm.engine.tp is None or llm.engine.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    from course_lib.engine import SamplingParams

    steps = 8
    prompts = B.random_prompts(batch, (context, context), llm.model_config.vocab_size, seed=11)
    seqs = [llm.engine.add_request(p, SamplingParams(max_tokens=steps + 2, ignore_eos=True)) for p in prompts]
    llm.engine.step()                                  # the prefill, outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            llm.engine.step()
        torch.cuda.synchronize()
    while llm.engine.has_unfinished():
        llm.engine.step()
    del seqs
    us = sum(e.device_time_total for e in prof.key_averages() if "nccl" in e.key.lower() or "allreduce" in e.key.lower())
    return us / 1e3 / steps


def run_engine(model, shape, args, device, dtype, peaks, prompts, outs, T, ctx, tp, record):
    """The engine's rows for one model at ``tp`` ranks (each row records ``tensor_parallel_size``)."""
    t = time.perf_counter()
    llm = LLM(model, device=device, dtype=dtype, block_size=args.block_size,
              max_num_batched_tokens=max(args.max_num_batched_tokens, max(args.prefill_batches) * T),
              max_num_seqs=args.max_num_seqs, gpu_memory_fraction=0.85 if device.type == "cuda" else None,
              enable_prefix_caching=True, attention=args.engine_attention, tensor_parallel_size=tp,
              cuda_graphs={"auto": None, "on": True, "off": False}[args.engine_graphs])
    try:
        runner = llm.engine.runner
        graphs = f"whole steps, {len(runner.step_graphs.buffers)} token buckets" if runner.step_graphs else "off"
        log(f"  engine (tensor_parallel_size={tp}) ready in {time.perf_counter() - t:.1f} s: "
            f"{llm.engine.block_manager.num_blocks} KV blocks, attention={runner.attention.name}, cuda graphs: {graphs}")
        del runner
        if "prefill" in args.workloads:
            for b in args.prefill_batches:
                r = B.engine_prefill(llm, b, T, peaks)
                record("engine", "prefill", b, T, T, r["tokens_per_s"], r["mfu"], r["mbu"], tensor_parallel_size=tp)
        if "decode" in args.workloads:
            for b in args.decode_batches:
                r = B.engine_decode(llm, b, ctx, args.decode_steps, peaks)
                record("engine", "decode", b, ctx, ctx, r["tokens_per_s"], r["mfu"], r["mbu"], tensor_parallel_size=tp,
                       allreduce_ms_per_step=allreduce_ms_per_step(llm, b, ctx))
        if "serving" in args.workloads and shape in args.serving_models:
            r = B.engine_serving(llm, prompts, outs)
            record("engine", "serving", args.num_requests, None, None, r["tokens_per_s"],
                   preemptions=llm.engine.scheduler.num_preemptions, tensor_parallel_size=tp)
    finally:
        llm.shutdown()


# ------------------------------------------------------------------ report
def system_label(r) -> str:
    """``engine``, or ``engine TP=2`` for a tensor-parallel row."""
    n = r.get("tensor_parallel_size", 1)
    return r["system"] + (f" TP={n}" if n > 1 else "")


def markdown(result) -> str:
    c = result["ceilings"]
    lines = [f"device: {result['device']} · torch {result['torch']} · transformers {result['transformers']}",
             f"ceilings: bf16 matmul {c['matmul_bf16_tflops']:.3g} TFLOP/s · copy {c['copy_gbps']:.0f} GB/s", "",
             "| model | workload | batch | system | tokens/s | MFU | MBU | compile s | engine vs transformers "
             "| engine vs torch.compile |", "|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"   # noqa: E731
    ratio = lambda v: f"{v:.2f}x" if v else ""                    # noqa: E731
    for r in result["runs"]:
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else f"error: {r.get('error', '')[:60]}"
        system = system_label(r) + ("" if r.get("cuda_graph", True) or r["workload"] != "decode" else " (eager)")
        if r["system"] == "torch-compile" and not r.get("compiled", True):
            system = "torch-compile (not compiled: no CUDA)"
        compile_s = f"{r['compile_s']:.1f}" if r.get("compile_s") else ""
        lines.append(f"| {r['model']} | {r['workload']} | {r['batch']} | {system} | {tps} | "
                     f"{pct(r['mfu'])} | {pct(r['mbu'])} | {compile_s} | {ratio(r.get('vs_transformers'))} "
                     f"| {ratio(r.get('vs_torch_compile'))} |")
    return "\n".join(lines)


def add_ratios(runs) -> None:
    """Each engine row gains ``vs_transformers`` and ``vs_torch_compile``: its tok/s over the peer's
    on the same model, workload and batch (None where the peer did not run or failed)."""
    def rates(systems):
        return {(r["model"], r["workload"], r["batch"]): r["tokens_per_s"] for r in runs
                if r["system"] in systems and r["tokens_per_s"]}
    hf, compiled = rates(("hf-generate", "hf-cb")), rates(("torch-compile",))
    for r in runs:
        if r["system"] == "engine":
            key = (r["model"], r["workload"], r["batch"])
            for name, peer in (("vs_transformers", hf), ("vs_torch_compile", compiled)):
                r[name] = r["tokens_per_s"] / peer[key] if r["tokens_per_s"] and key in peer else None


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = sorted({(r["model"], r["workload"], r["batch"]) for r in result["runs"] if r["workload"] != "load"})
    systems = sorted({system_label(r) for r in result["runs"]})
    fig, ax = plt.subplots(figsize=(10, 4.5))                     # fits a ~1,000 px page at 100 dpi
    width = 0.8 / max(1, len(systems))
    for j, s in enumerate(systems):
        vals = [next((r["tokens_per_s"] or 0 for r in result["runs"] if system_label(r) == s
                      and (r["model"], r["workload"], r["batch"]) == g), 0) for g in groups]
        ax.bar([i + j * width for i in range(len(groups))], vals, width, label=s)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{m}\n{w} B{b}" for m, w, b in groups], fontsize=8, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (log)")
    ax.set_title(result["device"])
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="gpt2,gpt2-xl")
    p.add_argument("--systems", default="engine,hf,hf-cb,torch-graph,torch-compile")
    p.add_argument("--workloads", default="prefill,decode,serving")
    p.add_argument("--serving-models", default="gpt2", help="models that run the serving workload")
    p.add_argument("--prefill-batches", default="1,8")
    p.add_argument("--decode-batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--serving-min-len", type=int, default=100)
    p.add_argument("--serving-max-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--hf-timeout", type=float, default=400, help="seconds before HF serving is given up")
    p.add_argument("--quick", action="store_true", help="64 requests, 32 decode steps")
    p.add_argument("--smoke", action="store_true", help="CPU-sized shapes, seconds; for CI")
    p.add_argument("--engine-graphs", choices=["auto", "on", "off"], default="auto",
                   help="whole-step CUDA graphs (auto: on with CUDA and triton)")
    p.add_argument("--engine-attention", default=None, choices=["torch", "triton"], help="attention path (default: triton on CUDA, torch on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--tensor-parallel-size", default="1", help="comma list of engine rank counts, e.g. 1,2")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    if args.smoke:
        torch.set_num_threads(1)                  # tiny shapes: threads only contend
        args.models, args.serving_models = "smoke", "smoke"
        args.prompt_len, args.context, args.decode_steps = 48, 24, 8
        args.num_requests, args.serving_min_len, args.serving_max_len = 4, 4, 12
        args.prefill_batches, args.decode_batches, args.hf_timeout = "1,2", "1,2", 60
        if args.systems == p.get_default("systems"):
            args.systems = "engine,hf,torch-graph,torch-compile"   # HF continuous batching idles ~30 s on CPU; add hf-cb to try it
    if args.quick:
        args.num_requests, args.decode_steps = min(args.num_requests, 64), min(args.decode_steps, 32)
    for name in ("models", "systems", "workloads", "serving_models"):
        setattr(args, name, [s for s in getattr(args, name).split(",") if s])
    args.prefill_batches = [int(b) for b in args.prefill_batches.split(",")]
    args.decode_batches = [int(b) for b in args.decode_batches.split(",")]
    args.tensor_parallel_size = [int(n) for n in str(args.tensor_parallel_size).split(",")]

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type != "cuda" and not args.smoke:
        log("no GPU: only --smoke makes sense on CPU")
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
        args.systems = [s for s in args.systems if s not in ("hf", "hf-cb")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    log(f"device {name}; measuring ceilings")
    peaks = B.ceilings(device, smoke=args.smoke)
    result = {"device": name, "torch": torch.__version__, "transformers": tf_version,
              "date": dt.date.today().isoformat(), "dtype": str(dtype).replace("torch.", ""),
              "ceilings": peaks, "settings": {k: v for k, v in vars(args).items() if k != "out"}, "runs": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    stem = out / (f"{result['date']}_{slug}" + ("_smoke" if args.smoke else ""))
    for shape in args.models:
        run_model(shape, args, device, dtype, peaks, result["runs"])
        add_ratios(result["runs"])
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")   # kept if a later model dies

    table = markdown(result)
    stem.with_suffix(".md").write_text(table + "\n")
    plot(result, stem.with_suffix(".png"))
    print(table)
    log(f"wrote {stem}.json")
    return result


if __name__ == "__main__":
    main()
