"""How far the host may run ahead of the device: the step graphs' staging ring (needs CUDA).

    python benchmarks/probe_staging.py OUT.json [--rounds 3]

Every replayed step fills one pinned host image of its buffers (step_graphs.Staging); an image is
filled again only after its last copy to the device is done, so the ring's length bounds how many
steps the host can be ahead. The engine takes ``2 * decode_burst + 2`` images (a whole decode
burst ahead); before, it took two. This probe builds one GPT-2 124M engine (random weights, bf16,
bench_engine's decode settings) and times bench_engine's decode rows (context 512, batch 1 and 32)
with a ring of two and with the engine's ring, swapped in turns on the same engine, ``--rounds``
times each: ms a step and tok/s, and beside them the replay time of that bucket's graph (with the
last step's buffers).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib import perf  # noqa: E402
from course_lib.engine import LLM  # noqa: E402
from course_lib.engine import benchmark as B  # noqa: E402
from course_lib.engine.step_graphs import Staging  # noqa: E402


def main() -> int:
    out_path = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else None
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    model = B.random_gpt("gpt2", "cuda", torch.bfloat16)
    llm = LLM(model, max_num_seqs=256, max_num_batched_tokens=8192)
    graphs = llm.engine.runner.step_graphs
    engine_ring = graphs.staging
    size = engine_ring.tensors[0].numel()
    rings = {2: Staging(size, pinned=True, images=2), len(engine_ring.tensors): engine_ring}
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "decode_burst": llm.engine.burst, "rows": []}
    for batch in (1, 32):
        times = {n: [] for n in rings}
        for _ in range(rounds):
            for n, ring in rings.items():
                graphs.staging = ring
                r = B.engine_decode(llm, batch, 512, steps=64)
                times[n].append(batch / r["tokens_per_s"] * 1e3)
        graphs.staging = engine_ring
        N = next(n for n in graphs.buffers if n >= batch)
        replay = perf.graph_replay_seconds(graphs.graphs[N][0], 100) * 1e3
        row = {"batch": batch, "replay_ms": replay,
               **{f"ms_per_step_ring{n}": ts for n, ts in times.items()},
               **{f"tokens_per_s_ring{n}": batch / statistics.median(ts) * 1e3 for n, ts in times.items()}}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    llm.shutdown()
    if out_path:
        Path(out_path).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
