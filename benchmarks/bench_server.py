"""Load on the HTTP server: requests/s, output tok/s, TTFT and ITL at 1, 16 and 128 concurrent clients.

Starts ``python -m course_lib.engine serve`` as a subprocess on 127.0.0.1 (a free port), then,
for each concurrency C, runs C clients in a closed loop (each sends its next request as soon as its
last one has finished) until ``--requests-per-client * C`` requests (at least ``--min-requests``)
are done. Every request streams (server-sent events) a random token-id prompt of ``--prompt-len``
tokens and ``--max-tokens`` output tokens (greedy, end-of-text ignored, so every request makes
exactly that many). The clients measure, at the client:

* TTFT: request sent → first token's chunk received;
* ITL: gaps between consecutive token chunks of one request (the server sends one per token);
* requests/s and output tokens/s over the wall time of the whole level.

The clients are asyncio + httpx in this process, the server is another process; on a small CPU the
two share cores, which the numbers include. Writes benchmarks/results/<date>_server_<device>.json,
.md (also printed) and .png (or --out DIR).

    python benchmarks/bench_server.py                              # CPU: tiny model, short requests
    python benchmarks/bench_server.py --model gpt2 --prompt-len 512 --max-tokens 256   # GPU
    python benchmarks/bench_server.py --smoke --out /tmp/b          # seconds (tests)

``--model`` is ``tiny``, a checkpoint directory, or a shape of course_lib.engine.benchmark
(``gpt2``, ``gpt2-xl``, ``smoke``: random weights, saved to a temporary checkpoint first).
Other flags after ``--`` go to the server (engine options), e.g. ``-- --num-kv-blocks 4096``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def percentile(values, q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between order statistics."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------------------- the server
def start_server(model: str, device: str | None, extra: list[str], timeout: float = 600):
    """``serve`` in a subprocess → (process, base URL). Raises when it does not come up."""
    cmd = [sys.executable, "-m", "course_lib.engine", "serve", "--model", model, "--port", "0",
           "--log-level", "warning", "--max-pending", "100000", *(["--device", device] if device else []), *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    if "serving" not in line or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, line.split(" on ")[1].split()[0].removesuffix("/v1")


def stop_server(proc) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# ---------------------------------------------------------------------------------------------- the clients
async def one_request(http, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    times = []
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                if '"error"' in line[:20]:
                    raise RuntimeError(line)
                times.append(time.perf_counter())
    return {"ttft": times[0] - t0, "itl": [b - a for a, b in zip(times, times[1:])], "tokens": len(times),
            "latency": times[-1] - t0}


def server_sums(url: str) -> dict:
    """Sums and counts of the server's own TTFT and ITL histograms, and its preemptions (/metrics)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    keep = {"course_time_to_first_token_seconds_sum", "course_time_to_first_token_seconds_count",
            "course_inter_token_latency_seconds_sum", "course_inter_token_latency_seconds_count",
            "course_preemptions_total"}
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name in keep}


async def load_level(url: str, model: str, concurrency: int, num_requests: int, prompts, max_tokens: int) -> dict:
    import httpx

    todo = list(range(num_requests))
    results = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        async def client():
            while todo:
                i = todo.pop()
                results.append(await one_request(http, url, model, prompts[i % len(prompts)], max_tokens))

        before = server_sums(url)
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        after = server_sums(url)
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    ttft = [r["ttft"] for r in results]
    itl = [g for r in results for g in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    assert tokens == num_requests * max_tokens, f"{tokens} tokens for {num_requests} x {max_tokens}"
    row = {"concurrency": concurrency, "requests": num_requests, "seconds": wall,
           "requests_per_s": num_requests / wall, "output_tokens_per_s": tokens / wall}
    for name, values in (("ttft", ttft), ("itl", itl)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}_ms"] = 1e3 * percentile(values, q)
        row[f"{name}_mean_ms"] = 1e3 * sum(values) / len(values) if values else None
    # the same two latencies as the server stamps them (engine token times), means from /metrics
    row["server_ttft_mean_ms"] = 1e3 * d["course_time_to_first_token_seconds_sum"] / max(
        1, d["course_time_to_first_token_seconds_count"])
    row["server_itl_mean_ms"] = 1e3 * d["course_inter_token_latency_seconds_sum"] / max(
        1, d["course_inter_token_latency_seconds_count"])
    row["preemptions"] = int(d.get("course_preemptions_total", 0))
    return row


# ---------------------------------------------------------------------------------------------- report
def markdown(result) -> str:
    s = result["settings"]
    lines = [f"Server load, {result['device']} ({result['model']}, prompt {s['prompt_len']} tokens, "
             f"{s['max_tokens']} output tokens, greedy, streamed; {result['date']})", "",
             "| clients | requests | requests/s | output tok/s | TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) "
             "| server TTFT / ITL mean (ms) | preemptions |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | "
                     f"{r['output_tokens_per_s']:.0f} | {r['ttft_p50_ms']:.1f} / {r['ttft_p90_ms']:.1f} / "
                     f"{r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.1f} / {r['itl_p90_ms']:.1f} / "
                     f"{r['itl_p99_ms']:.1f} | "
                     f"{r['server_ttft_mean_ms']:.1f} / {r['server_itl_mean_ms']:.1f} | {r['preemptions']} |")
    lines += ["", "TTFT and ITL percentiles are measured at the client (chunk arrival); the server's means come "
              "from its /metrics histograms (engine token times). ITL p50 of 0 means chunks arrived together: "
              "the client or the server's event loop, not the engine, was the bottleneck."]
    return "\n".join(lines)


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = result["runs"]
    c = [r["concurrency"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    ax = axes[0]
    ax.plot(c, [r["output_tokens_per_s"] for r in runs], "o-")
    ax.set_ylabel("output tokens/s")
    per_request = result["settings"]["max_tokens"]      # every request makes exactly this many tokens
    right = ax.secondary_yaxis("right", functions=(lambda x: x / per_request, lambda x: x * per_request))
    right.set_ylabel("requests/s")
    right.tick_params(labelsize=8)
    ax.set_title("throughput", fontsize=9)
    for ax, name, title in ((axes[1], "ttft", "time to first token"), (axes[2], "itl", "inter-token latency")):
        for q, style in ((50, "o-"), (90, "^-"), (99, "v-")):
            ax.plot(c, [max(r[f"{name}_p{q}_ms"], 1e-2) for r in runs], style, label=f"p{q} (client)")
        ax.plot(c, [r[f"server_{name}_mean_ms"] for r in runs], "k--", label="mean (server)")
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(c)
        ax.set_xticklabels([str(x) for x in c])
        ax.set_xlabel("concurrent clients")
        ax.tick_params(labelsize=8)
    fig.suptitle(f"server load: {result['device']}, {result['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--concurrency", default="1,16,128", help="comma-separated client counts")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny, 1 and 4 clients, 8 tokens: seconds")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.concurrency, args.prompt_len, args.max_tokens, args.min_requests = "1,4", 8, 8, 4
    levels = [int(x) for x in args.concurrency.split(",")]

    import torch

    from course_lib import checkpoint
    from course_lib.engine import benchmark as B

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory() as tmp:
        model_arg, vocab = args.model, None
        if args.model in B.SHAPES:
            log(f"saving random {args.model} weights to a temporary checkpoint")
            model = B.random_gpt(args.model, "cpu", torch.float32)
            checkpoint.save(model, Path(tmp) / args.model)
            model_arg, vocab = str(Path(tmp) / args.model), model.config.vocab_size
            del model
        elif args.model == "tiny":
            from course_lib.tiny import TINY_DIR
            vocab = json.loads((TINY_DIR / "config.json").read_text())["vocab_size"]
        else:
            vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
        served = "tiny" if args.model == "tiny" else Path(model_arg).name
        rng = random.Random(args.seed)
        prompts = [[rng.randrange(1, vocab) for _ in range(args.prompt_len)] for _ in range(max(levels) * 4)]
        log(f"device {name}; starting the server")
        proc, url = start_server(model_arg, str(device), extra)
        try:
            asyncio.run(load_level(url, served, 1, 2, prompts, args.max_tokens))          # warm-up
            runs = []
            for c in levels:
                n = max(args.min_requests, args.requests_per_client * c)
                log(f"  {c} clients, {n} requests")
                runs.append(asyncio.run(load_level(url, served, c, n, prompts, args.max_tokens)))
        finally:
            stop_server(proc)
    result = {"device": name, "model": args.model, "torch": torch.__version__, "date": dt.date.today().isoformat(),
              "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"server_flags": extra},
              "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name.split(" (")[0]).strip("-").lower()
    stem = out / (f"{result['date']}_server_{slug}" + ("_smoke" if args.smoke else ""))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    stem.with_suffix(".md").write_text(table + "\n")
    plot(result, stem.with_suffix(".png"))
    print(table)
    log(f"wrote {stem}.json, .md, .png")
    return result


if __name__ == "__main__":
    main()
