"""Command line: generate text, benchmark the engine, or serve it over HTTP.

    python -m course_lib.engine generate --model tiny --prompt "def " --max-tokens 20
    python -m course_lib.engine generate --model path/to/checkpoint --prompt-ids 464,3290 --max-tokens 20
    python -m course_lib.engine bench --model gpt2 --workloads prefill,decode,serving
    python -m course_lib.engine generate --model tiny --prompt "def " --tensor-parallel-size 2
    python -m course_lib.engine serve --model tiny --port 8000     # OpenAI-compatible, server.py

All take the engine's settings (:class:`~course_lib.engine.config.EngineConfig`) as flags.
``bench`` measures this engine alone (``--model`` = a shape name with random weights:
gpt2, gpt2-xl, smoke; or a checkpoint directory, or tiny); benchmarks/bench_engine.py puts it
beside HF transformers. Every bad flag ends in a one-line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import CourseError

WORKLOADS = ("prefill", "decode", "serving")


def int_list(text: str) -> list[int]:
    """``"1,8,32"`` → ``[1, 8, 32]``; an argparse type, so garbage is a clean error."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one integer, e.g. 1,2,3")
    return values


def positive_list(text: str) -> list[int]:
    values = int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be a positive integer")
    return values


def positive_int(text: str) -> int:
    return positive_list(text)[0] if "," not in text else _one_int(text)


def _one_int(text: str) -> int:
    raise argparse.ArgumentTypeError(f"{text!r} is not one positive integer")


def workload_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown workload(s) {unknown or [text]}; choose from {','.join(WORKLOADS)}")
    return names


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The EngineConfig fields as flags (defaults: the engine's own choices)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    g.add_argument("--block-size", type=int, default=16, help="token slots per KV block")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks")
    g.add_argument("--gpu-memory-fraction", type=float, default=None, help="GPU memory for weights + KV pool")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step")
    g.add_argument("--max-num-seqs", type=int, default=None, help="requests in one step")
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--attention", choices=["torch", "triton"], default=None)
    g.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="ranks (processes; GPUs on CUDA) the heads and MLP columns are split over")
    g.add_argument("--max-kv-splits", type=int, default=None,
                   help="split-KV decode attention: key chunks per sequence and head (1: off; default 32 on CUDA)")
    g.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto",
                   help="prepare step n+1 while the device runs step n (auto: on, off with tensor parallelism)")
    g.add_argument("--decode-burst", type=int, default=None,
                   help="decode steps one scheduling may run when every row is a greedy decode and nobody "
                        "waits (1: off; default 8 on CUDA, 1 on CPU)")


def engine_config(args):
    from .config import EngineConfig

    return EngineConfig(device=args.device, dtype=args.dtype, block_size=args.block_size,
                        num_kv_blocks=args.num_kv_blocks, gpu_memory_fraction=args.gpu_memory_fraction,
                        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                        enable_chunked_prefill=args.enable_chunked_prefill,
                        enable_prefix_caching=args.enable_prefix_caching, attention=args.attention,
                        cuda_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs],
                        tensor_parallel_size=args.tensor_parallel_size, max_kv_splits=args.max_kv_splits,
                        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
                        decode_burst=args.decode_burst)


def cmd_generate(args) -> int:
    from .llm import LLM
    from .sequence import SamplingParams

    prompts = list(args.prompt or []) + list(args.prompt_ids or [])
    if not prompts:
        raise CourseError("give --prompt TEXT or --prompt-ids 1,2,3 (repeatable)")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    llm = LLM(args.model, config=engine_config(args))
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
    import dataclasses

    from . import benchmark as B
    from .llm import LLM

    config = engine_config(args).resolve_device_and_dtype()
    peaks = B.ceilings(config.device, smoke=args.model in ("smoke", "tiny"))
    model = B.random_gpt(args.model, config.device, config.dtype) if args.model in B.SHAPES else args.model
    llm = LLM(model, config=dataclasses.replace(config, peak_flops=peaks["matmul_bf16_tflops"] * 1e12,
                                                peak_bandwidth=peaks["copy_gbps"] * 1e9))
    cfg = llm.config
    rows = []
    T = min(args.prompt_len, cfg.n_positions - 1)
    ctx = min(args.context, cfg.n_positions - args.decode_steps - 2)
    for workload in args.workloads:
        for batch in args.batches:
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
    print(f"device {config.device}, ceilings: {peaks['matmul_bf16_tflops']:.1f} TFLOP/s, {peaks['copy_gbps']:.0f} GB/s")
    print("| workload | batch | tokens/s | MFU | MBU |\n|---|---|---|---|---|")
    for r in rows:
        pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"   # noqa: E731
        print(f"| {r['workload']} | {r['batch']} | {r['tokens_per_s']:.0f} | {pct(r['mfu'])} | {pct(r['mbu'])} |")
    if args.json:
        print(json.dumps({"ceilings": peaks, "runs": rows}))
    return 0


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0..65535; 0 picks a free one)")
    return port


def cmd_serve(args) -> int:
    try:
        from . import server
    except ImportError as e:
        raise CourseError(f"the server needs fastapi, uvicorn and prometheus-client ({e}); "
                          "pip install -r requirements.txt") from None
    from pathlib import Path

    from .llm import LLM

    sock = server.bind_socket(args.host, args.port)      # a taken port is a one-line error before loading
    sock.close()
    llm = LLM(args.model, config=engine_config(args))
    name = args.served_model_name or (args.model if args.model == "tiny" else Path(args.model).name)
    server.serve(llm, args.host, args.port, model_name=name, max_pending=args.max_pending,
                 log_level=args.log_level, shutdown_timeout=args.shutdown_timeout)
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):           # one line and exit status 2, as argparse does, but no usage dump
        self.exit(2, f"error: {message} (see --help)\n")


def main(argv=None) -> int:
    parser = _Parser(prog="python -m course_lib.engine", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument("--model", default="tiny", help="'tiny', a checkpoint directory, or (bench) a shape name")
    add_engine_arguments(common)

    g = sub.add_parser("generate", parents=[common], help="generate text")
    g.add_argument("--prompt", action="append", help="text prompt (repeatable)")
    g.add_argument("--prompt-ids", action="append", type=int_list, help="comma-separated token ids (repeatable)")
    g.add_argument("--max-tokens", type=int, default=20)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt)")

    b = sub.add_parser("bench", parents=[common], help="measure prefill, decode and serving throughput")
    b.add_argument("--workloads", type=workload_list, default=list(WORKLOADS))
    b.add_argument("--batches", type=positive_list, default=[1, 8])
    b.add_argument("--prompt-len", type=positive_int, default=1024)
    b.add_argument("--context", type=positive_int, default=512)
    b.add_argument("--decode-steps", type=positive_int, default=64)
    b.add_argument("--num-requests", type=positive_int, default=256)
    b.add_argument("--serving-min-len", type=positive_int, default=100)
    b.add_argument("--serving-max-len", type=positive_int, default=1024)
    b.add_argument("--json", action="store_true")

    s = sub.add_parser("serve", parents=[common], help="serve the OpenAI completions API over HTTP")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=port_number, default=8000)
    s.add_argument("--served-model-name", default=None, help="the name clients pass as model (default: "
                   "'tiny' or the checkpoint directory's name)")
    s.add_argument("--max-pending", type=positive_int, default=256,
                   help="prompts in the engine at once; more get 503 + Retry-After")
    s.add_argument("--shutdown-timeout", type=float, default=None,
                   help="seconds requests in flight get to finish on Ctrl-C/SIGTERM (default: no limit)")
    s.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")

    args = parser.parse_args(argv)
    commands = {"generate": cmd_generate, "bench": cmd_bench, "serve": cmd_serve}
    try:
        return commands[args.command](args)
    except CourseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
