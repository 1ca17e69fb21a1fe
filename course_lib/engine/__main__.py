"""Command line: generate text, or benchmark the engine.

    python -m course_lib.engine generate --model tiny --prompt "def " --max-tokens 20
    python -m course_lib.engine generate --model path/to/checkpoint --prompt-ids 464,3290 --max-tokens 20
    python -m course_lib.engine bench --model gpt2 --workloads prefill,decode,serving

``bench`` measures this engine alone (``--model`` = a shape name with random weights:
gpt2, gpt2-xl, smoke; or a checkpoint directory, or tiny); benchmarks/bench_engine.py puts it
beside HF transformers. Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import CourseError


def _llm(args, **extra):
    from .llm import LLM

    return LLM(args.model, device=args.device, dtype=args.dtype, block_size=args.block_size, **extra)


def cmd_generate(args) -> int:
    from .sequence import SamplingParams

    llm = _llm(args)
    prompts = list(args.prompt or [])
    for ids in args.prompt_ids or []:
        prompts.append([int(t) for t in ids.split(",") if t.strip()])
    if not prompts:
        raise CourseError("give --prompt TEXT or --prompt-ids 1,2,3 (repeatable)")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    if args.stream and len(prompts) == 1:
        for ev in llm.stream(prompts, params):
            print(ev.text if ev.text is not None else f"{ev.token_id} ", end="", flush=True)
        print()
        return 0
    for out in llm.generate(prompts, params):
        shown = out.text if out.text is not None else " ".join(map(str, out.token_ids))
        m = out.metrics
        tpot = f"{m.tpot * 1e3:.2f} ms" if m.tpot is not None else "-"
        print(f"[{out.index}] {shown!r}\n    ({m.num_output_tokens} tokens, {out.finish_reason}; "
              f"TTFT {m.ttft * 1e3:.1f} ms, TPOT {tpot})")
    return 0


def cmd_bench(args) -> int:
    from . import benchmark as B
    from .llm import LLM, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    peaks = B.ceilings(device, smoke=args.model in ("smoke", "tiny"))
    model = B.random_gpt(args.model, device, dtype) if args.model in B.SHAPES else args.model
    llm = LLM(model, device=device, dtype=dtype, block_size=args.block_size,
              max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
    cfg = llm.config
    rows = []
    T = min(args.prompt_len, cfg.n_positions - 1)
    ctx = min(args.context, cfg.n_positions - args.decode_steps - 2)
    for workload in args.workloads.split(","):
        for batch in map(int, args.batches.split(",")):
            if workload == "prefill":
                r = B.engine_prefill(llm, batch, T, peaks)
            elif workload == "decode":
                r = B.engine_decode(llm, batch, ctx, args.decode_steps, peaks)
            else:
                continue
            rows.append({"workload": workload, "batch": batch, **r})
    if "serving" in args.workloads:
        hi = min(args.serving_max_len, cfg.n_positions // 2)
        prompts, outs = B.serving_workload(args.num_requests, min(args.serving_min_len, hi), hi, cfg.vocab_size)
        rows.append({"workload": "serving", "batch": args.num_requests, **B.engine_serving(llm, prompts, outs)})
    print(f"device {device}, ceilings: {peaks['matmul_bf16_tflops']:.1f} TFLOP/s, {peaks['copy_gbps']:.0f} GB/s")
    print("| workload | batch | tokens/s | MFU | MBU |\n|---|---|---|---|---|")
    for r in rows:
        pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"   # noqa: E731
        print(f"| {r['workload']} | {r['batch']} | {r['tokens_per_s']:.0f} | {pct(r['mfu'])} | {pct(r['mbu'])} |")
    if args.json:
        print(json.dumps({"ceilings": peaks, "runs": rows}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.engine", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="tiny", help="'tiny', a checkpoint directory, or (bench) a shape name")
    common.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    common.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    common.add_argument("--block-size", type=int, default=16)

    g = sub.add_parser("generate", parents=[common], help="generate text")
    g.add_argument("--prompt", action="append", help="text prompt (repeatable)")
    g.add_argument("--prompt-ids", action="append", help="comma-separated token ids (repeatable)")
    g.add_argument("--max-tokens", type=int, default=20)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt)")

    b = sub.add_parser("bench", parents=[common], help="measure prefill, decode and serving throughput")
    b.add_argument("--workloads", default="prefill,decode,serving")
    b.add_argument("--batches", default="1,8")
    b.add_argument("--prompt-len", type=int, default=1024)
    b.add_argument("--context", type=int, default=512)
    b.add_argument("--decode-steps", type=int, default=64)
    b.add_argument("--num-requests", type=int, default=256)
    b.add_argument("--serving-min-len", type=int, default=100)
    b.add_argument("--serving-max-len", type=int, default=1024)
    b.add_argument("--max-num-batched-tokens", type=int, default=None)
    b.add_argument("--max-num-seqs", type=int, default=None)
    b.add_argument("--json", action="store_true")

    args = parser.parse_args(argv)
    try:
        return cmd_generate(args) if args.command == "generate" else cmd_bench(args)
    except CourseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
