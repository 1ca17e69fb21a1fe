"""The greedy argmax on the GPU: torch.argmax against the step graphs' kernel (triton_argmax.py).

    PYTHONPATH=$PWD python3 benchmarks/probe_argmax.py --out $OUT        # H100/H200: ~15 s

For R = 1..256 logit rows of GPT-2's 50,257 bf16 logits (the fused head's padded width, as the
engine's logits buffer): both answers must be equal (random logits with many ties: bf16 holds
few distinct values near the maximum), then the time per call, from a CUDA graph of 20 calls
replayed 50 times (the logits stay in L2, as after the LM head that just wrote them). Writes
``probe_argmax.json`` (device, versions, raw times).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_lib.engine.triton_argmax import ArgmaxRows  # noqa: E402

V, WIDTH, CALLS, REPLAYS = 50257, 50304, 20, 50


def graph_us(fn) -> float:
    """Microseconds per call of ``fn``, from a graph of CALLS calls (warmed up, then captured)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (REPLAYS * CALLS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_argmax.py needs a CUDA GPU")
    torch.manual_seed(0)
    rows = []
    for R in (1, 8, 32, 64, 256):
        buf = torch.randn(R, WIDTH, device="cuda").to(torch.bfloat16)      # (R, width)
        logits = buf[:, :V]                                                 # (R, V), rows of stride width
        am = ArgmaxRows(R, "cuda")
        live = torch.tensor([R], device="cuda")
        out = torch.empty(R, dtype=torch.long, device="cuda")
        am(logits, live, out)
        ref = logits.argmax(-1)
        equal = bool(torch.equal(out, ref))
        ties = int((logits == logits.max(-1, keepdim=True).values).sum(-1).gt(1).sum())
        torch_us = graph_us(lambda: logits.argmax(-1))
        ours_us = graph_us(lambda: am(logits, live, out))
        rows.append({"rows": R, "equal": equal, "rows_with_tied_maximum": ties,
                     "torch_argmax_us": round(torch_us, 2), "argmax_rows_us": round(ours_us, 2),
                     "argmax_rows_GBps": round(R * V * 2 / ours_us / 1e3, 1)})
        print(rows[-1], flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "vocab": V, "width": WIDTH,
              "calls_per_graph": CALLS, "replays": REPLAYS, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_argmax.json").write_text(json.dumps(result, indent=1) + "\n")
    if not all(r["equal"] for r in rows):
        sys.exit("the kernel's tokens differ from torch.argmax")


if __name__ == "__main__":
    main()
