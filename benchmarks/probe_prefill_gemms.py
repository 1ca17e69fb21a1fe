"""The prefill steps' weight products alone, as the engine calls cuBLAS, beside the other weight layout.

    PYTHONPATH=$PWD python3 benchmarks/probe_prefill_gemms.py --out $OUT      # a CUDA GPU, ~1 minute

The fused forward stores every projection K-contiguous (``W.T`` row-major, fused_forward.py), which
the decode GEMVs need; cuBLAS runs the prefill products on the same tensors. For GPT-2 124M's and
XL's four products of a layer at 1,024 and 8,192 rows (bench_engine's prefill rows), bf16, this
times, each inside a CUDA graph that calls the product on 2-8 distinct weight copies (more than L2
holds for XL's QKV and MLP products; the other copies fit in it, which matters little to products
bound by the tensor cores at these row counts):

* ``engine``: the engine's call on the K-contiguous weight (``addmm`` with the bias for QKV,
  cuBLASLt's bias + GELU epilogue for the first MLP product, ``mm`` for the two projections, whose
  bias add_layernorm adds);
* ``n_contiguous``: the same call on the same values stored ``(K, N)`` row-major;
* ``no_epilogue``: for the MLP's first product, ``mm`` alone (what a separate bias + GELU kernel
  would then need besides);

and reports TFLOP/s against the device's matmul ceiling measured in the same run. If one layout
is faster at prefill the numbers say by how much; it decides nothing by itself (the decode GEMVs
need K-contiguous weights, and two copies would double the weights' memory).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib import perf  # noqa: E402

#: (model, D): GPT-2 124M and XL widths; the MLP is 4 D wide
MODELS = (("gpt2", 768), ("gpt2-xl", 1600))
ROWS = (1024, 8192)


def products(D: int):
    """(name, K, N, call) of one layer's four products; ``call(x, w, b)`` runs the engine's kind."""
    return (("c_attn", D, 3 * D, lambda x, w, b: torch.addmm(b, x, w)),
            ("attn.c_proj", D, D, lambda x, w, b: torch.mm(x, w)),
            ("mlp.c_fc", D, 4 * D, lambda x, w, b: torch._addmm_activation(b, x, w, use_gelu=True)),
            ("mlp.c_proj", 4 * D, D, lambda x, w, b: torch.mm(x, w)))


def timed(call, x, weights, b) -> float:
    """Seconds a product, median of graph replays that run it once per weight copy."""
    return perf.captured_seconds([lambda: [call(x, w, b) for w in weights]]) / len(weights)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_prefill_gemms needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    ceiling = perf.measure_ceilings(device).peak_flops
    print(f"{torch.cuda.get_device_name()}: matmul ceiling {ceiling / 1e12:.0f} TFLOP/s")
    rows = []
    for model, D in MODELS:
        for name, K, N, call in products(D):
            copies = max(2, min(8, (256 << 20) // (K * N * 2)))             # XL's big ones: > L2 (50 MB)
            k_contiguous = [(torch.randn(N, K, device=device) / K ** 0.5).to(dtype).t() for _ in range(copies)]
            n_contiguous = [w.contiguous() for w in k_contiguous]           # same values, (K, N) row-major
            b = torch.randn(N, device=device, dtype=dtype)
            for M in ROWS:
                x = torch.randn(M, K, device=device, dtype=dtype)
                flops = 2 * M * K * N
                r = {"model": model, "product": name, "M": M, "K": K, "N": N,
                     "engine_s": timed(call, x, k_contiguous, b), "n_contiguous_s": timed(call, x, n_contiguous, b)}
                if name == "mlp.c_fc":
                    r["no_epilogue_s"] = timed(lambda x, w, b: torch.mm(x, w), x, k_contiguous, b)
                for key in [k for k in r if k.endswith("_s")]:
                    r[key[:-len("_s")] + "_tflops"] = flops / r[key] / 1e12
                rows.append(r)
                print(f"{model:8} {name:12} M={M:5}: engine {r['engine_s'] * 1e6:7.1f} us ({r['engine_tflops']:4.0f})"
                      f"  n-contiguous {r['n_contiguous_s'] * 1e6:7.1f} us ({r['n_contiguous_tflops']:4.0f})"
                      + (f"  mm alone {r['no_epilogue_s'] * 1e6:7.1f} us" if "no_epilogue_s" in r else ""))
    result = {"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "matmul_ceiling_flops": ceiling, "rows": rows}
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{result['date']}_{perf.device_name(device).replace(' ', '-').lower()}_prefill_gemms.json").write_text(
            json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
