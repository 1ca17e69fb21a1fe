"""Where a decode step's device time goes in the engine (H200 probe, session 4).

For GPT-2 124M and XL at batch 1 and 32, context ~512: the engine's decode rate with decode bursts
on and off; the step graph replayed with the buffers of a real decode step (live tiles, K/V written
to real slots) and with all-zero buffers (no live tile: attention exits at once, every row writes
the null block — what earlier probes replayed); and the attention kernel alone, every layer's call
of that step captured in one graph. Writes JSON to the path given (default: stdout only).

    python benchmarks/probe_decode_step.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch

from course_lib import perf
from course_lib.engine import LLM
from course_lib.engine import benchmark as B


def probe(shape: str) -> list[dict]:
    model = B.random_gpt(shape, "cuda", torch.bfloat16)
    cfg = model.config
    out = []
    engines = {burst: LLM(model, max_num_seqs=64, max_num_batched_tokens=8192, decode_burst=burst) for burst in (8, 1)}
    for batch in (1, 32):
        rec = {"model": shape, "batch": batch}
        for burst, llm in engines.items():
            r = B.engine_decode(llm, batch, 512, steps=64)
            rec[f"engine_ms_per_step_burst{burst}"] = batch / r["tokens_per_s"] * 1e3
        runner = engines[8].engine.runner
        graphs = runner.step_graphs
        N = next(n for n in graphs.buffers if n >= batch)
        buf, graph = graphs.buffers[N], graphs.graphs[N][0]
        rec["bucket"] = N
        rec["live_context_lens"] = buf.views["context_lens"][:batch].tolist()[:4]
        rec["replay_live_ms"] = perf.graph_replay_seconds(graph, 100) * 1e3
        saved = buf.device.clone()
        buf.device.zero_()
        rec["replay_zero_ms"] = perf.graph_replay_seconds(graph, 100) * 1e3
        buf.device.copy_(saved)
        meta = graphs.static_batch(buf).attention
        H, Dh = runner.kv.num_heads, cfg.head_dim
        q = torch.randn(N, H, Dh, device="cuda", dtype=torch.bfloat16)
        layers = range(cfg.n_layer)
        rec["attention_all_layers_ms"] = perf.captured_seconds(
            [lambda l=l: runner.attention.forward(q, q, q, runner.kv, l, meta) for l in layers], 50) * 1e3
        rec["attention_splits"] = runner.attention.num_splits(meta, H, q.device)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
        out.append(rec)
    for llm in engines.values():
        llm.shutdown()
    return out


if __name__ == "__main__":
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for shape in ("gpt2", "gpt2-xl"):
        results["runs"] += probe(shape)
        torch.cuda.empty_cache()
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
