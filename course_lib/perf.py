"""Counting and measuring: FLOPs and bytes of a step, and this machine's two ceilings.

Two halves, both introduced in notebooks/10_prefill_vs_decode_on_your_hardware.ipynb
(the per-op table of one layer in notebooks/07_prefill.ipynb):

* **counters** (pure arithmetic, no timing): :func:`gemm_flops`, :func:`gemm_bytes`,
  :func:`step_cost` for a whole prefill or decode step of a GPT config, and
  :func:`layer_op_table` for every op of one layer, read off the live tensors of a
  :class:`~course_lib.model.Trace`.
* **measurements**: :func:`measure_ceilings` times a large matmul (peak FLOP/s) and a large
  copy (memory bandwidth) on this device; :func:`time_prefill` and :func:`time_decode_step`
  time the model. Every timing is the best of a few repeats (other programs only ever add
  time, so the fastest repeat is the least disturbed one), synchronised on a GPU.

Conventions (stated once, used everywhere): a multiply-add is 2 FLOPs; a step's bytes are a
*lower bound* on memory traffic: each weight read once, the cached keys/values read once, the
new ones written once, the residual stream in and out of each layer, the logits written.
Intermediates (scores, MLP hidden) are assumed to stay on chip, as in a fused kernel.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import GPTConfig
from .errors import InputError
from .model import kv_cache_bytes

# --------------------------------------------------------------------------- GEMM and GEMV


def _check_positive(**sizes):
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise InputError(f"{name} must be a positive number, got {v!r}")


def gemm_flops(m: int, n: int, k: int) -> int:
    """FLOPs of ``(m, k) @ (k, n)``: ``m * n`` outputs, each ``k`` multiply-adds = ``2mnk``."""
    _check_positive(m=m, n=n, k=k)
    return 2 * m * n * k


def gemm_bytes(m: int, n: int, k: int, bytes_per_element: int = 4) -> int:
    """Bytes moved by ``(m, k) @ (k, n)`` if each operand is read once and the result written once."""
    _check_positive(m=m, n=n, k=k, bytes_per_element=bytes_per_element)
    return (m * k + k * n + m * n) * bytes_per_element


def arithmetic_intensity(flops: float, nbytes: float) -> float:
    """FLOPs per byte moved: the x axis of the roofline."""
    _check_positive(flops=flops, nbytes=nbytes)
    return flops / nbytes


# --------------------------------------------------------------------------- a model step


@dataclass(frozen=True)
class StepCost:
    """FLOPs and bytes of one forward call, split by where they come from."""

    flops: dict
    bytes: dict
    batch: int
    new_tokens: int
    past: int

    @property
    def total_flops(self) -> float:
        return float(sum(self.flops.values()))

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes.values()))

    @property
    def intensity(self) -> float:
        return self.total_flops / self.total_bytes


def layer_matmul_params(config: GPTConfig) -> int:
    """Weights one token multiplies through in one block: W_qkv, W_o, W_fc, W_proj."""
    D, F = config.n_embd, config.mlp_dim
    return D * 3 * D + D * D + D * F + F * D


def parameter_count(config: GPTConfig, non_embedding: bool = True) -> int:
    """Stored parameters from the config alone (== ``GPT.num_params``; tied LM head counted once)."""
    D, F = config.n_embd, config.mlp_dim
    per_layer = layer_matmul_params(config) + 3 * D + D + F + D + 4 * D  # + biases + two LayerNorms
    n = config.n_layer * per_layer + 2 * D                               # + ln_f
    if not non_embedding:
        n += config.vocab_size * D + config.n_positions * D
    return n


def keys_seen(new_tokens: int, past: int = 0, causal: bool = True) -> int:
    """Sum over ``new_tokens`` queries placed after ``past`` cached tokens of the keys each sees:
    a query at absolute position ``p`` sees ``p + 1`` keys under the causal mask; without it every
    query is charged for all ``past + new_tokens`` keys. Ints, or numpy arrays element by element."""
    T, P = new_tokens, past
    return T * P + T * (T + 1) // 2 if causal else T * (P + T)


def attention_flops(config: GPTConfig, batch: int, new_tokens: int, past: int = 0,
                    causal: bool = True) -> int:
    """FLOPs of ``q @ kᵀ`` and ``weights @ v`` in all layers (scale/softmax not counted).

    A query at absolute position ``p`` sees ``p + 1`` keys: ``2·Dh·(p+1)`` FLOPs per head for the
    scores and as many for the weighted sum, i.e. ``4·D·(p+1)`` over all heads. With
    ``causal=False`` every query is charged for all ``past + new_tokens`` keys: what a kernel that
    computes the full rectangle and masks afterwards executes (notebooks/09).
    """
    _check_positive(batch=batch, new_tokens=new_tokens)
    if past < 0:
        raise InputError(f"past must be >= 0, got {past}")
    return 4 * config.n_embd * keys_seen(new_tokens, past, causal) * config.n_layer * batch


@dataclass(frozen=True)
class CostRates:
    """What one token, key, cached position and logit row cost for a model: the constants of
    :func:`batch_cost`'s formulas, per config and element size (:func:`cost_rates`)."""

    linear_flops_per_token: int        # the four weight products of every layer
    attention_flops_per_key: int       # q·k and weights·v, all heads and layers, per key a query sees
    head_flops_per_row: int            # the LM head, per row that samples
    body_weight_bytes: int             # every non-embedding parameter
    head_weight_bytes: int             # the (tied) LM head, read when any row samples
    kv_bytes_per_position: int         # K and V of one position, all layers and heads
    embedding_bytes_per_token: int     # its wte and wpe rows
    activation_bytes_per_token: int    # the residual stream in and out of every layer
    logit_bytes_per_row: int


def cost_rates(config: GPTConfig, bytes_per_element: int = 4) -> CostRates:
    D, V, L, e = config.n_embd, config.vocab_size, config.n_layer, bytes_per_element
    return CostRates(linear_flops_per_token=2 * layer_matmul_params(config) * L, attention_flops_per_key=4 * D * L,
                     head_flops_per_row=2 * D * V, body_weight_bytes=parameter_count(config, non_embedding=True) * e,
                     head_weight_bytes=V * D * e, kv_bytes_per_position=kv_cache_bytes(config, 1, 1, e),
                     embedding_bytes_per_token=2 * D * e, activation_bytes_per_token=2 * L * D * e,
                     logit_bytes_per_row=V * e)


def ragged_sums(query_lens, context_lens, causal: bool = True) -> tuple[int, int, int]:
    """``(new tokens, keys the queries see, positions whose K/V are read)`` of a ragged batch
    (request ``i``: ``query_lens[i]`` new tokens after ``context_lens[i] - query_lens[i]`` cached)."""
    if len(query_lens) != len(context_lens) or not len(query_lens):
        raise InputError("query_lens and context_lens must be equally long and not empty")
    if len(query_lens) <= 64:                       # the engine's decode steps: Python ints beat numpy's overhead
        q = query_lens.tolist() if isinstance(query_lens, np.ndarray) else list(query_lens)
        c = context_lens.tolist() if isinstance(context_lens, np.ndarray) else list(context_lens)
        tokens, positions = sum(q), sum(c)
        if tokens == len(q):                        # one new token each: it sees every position, masked or not
            return tokens, positions, positions
        return tokens, sum(keys_seen(qi, ci - qi, causal) for qi, ci in zip(q, c)), positions
    q = np.asarray(query_lens, dtype=np.int64)                 # (B,) one pass over the batch
    c = np.asarray(context_lens, dtype=np.int64)
    return int(q.sum()), int(keys_seen(q, c - q, causal).sum()), int(c.sum())


def batch_cost(config: GPTConfig, query_lens, context_lens, num_logit_rows: int,
               bytes_per_element: int = 4, causal: bool = True) -> StepCost:
    """FLOPs and bytes of one forward over a *ragged* batch: request ``i`` computes
    ``query_lens[i]`` new tokens after ``context_lens[i] - query_lens[i]`` cached ones, and
    ``num_logit_rows`` rows go through the LM head. :func:`step_cost` is the same for ``batch``
    equal requests; the engine's ledger counts every step with :func:`batch_totals`, the same sums."""
    tokens, keys, positions = ragged_sums(query_lens, context_lens, causal)
    r = cost_rates(config, bytes_per_element)
    flops = {
        "linear": r.linear_flops_per_token * tokens,
        "attention": r.attention_flops_per_key * keys,
        "lm_head": r.head_flops_per_row * num_logit_rows,
    }
    nbytes = {
        "weights": r.body_weight_bytes + (r.head_weight_bytes if num_logit_rows else 0),
        "embeddings": r.embedding_bytes_per_token * tokens,     # wte rows + wpe rows gathered
        "kv_read": r.kv_bytes_per_position * positions,         # every visible key and value, once
        "kv_write": r.kv_bytes_per_position * tokens,           # the new keys and values
        "activations": r.activation_bytes_per_token * tokens,   # residual stream in and out per layer
        "logits": r.logit_bytes_per_row * num_logit_rows,
    }
    past = int(context_lens[0]) - int(query_lens[0])
    return StepCost(flops=flops, bytes=nbytes, batch=len(query_lens), new_tokens=int(query_lens[0]), past=past)


def batch_totals(rates: CostRates, query_lens, context_lens, num_logit_rows: int) -> tuple[int, int]:
    """``(FLOPs, weight + KV-read bytes)`` of :func:`batch_cost` (its ``total_flops`` and its
    ``weights`` + ``kv_read``) without the breakdown: what the engine's ledger counts every step,
    from ``rates = cost_rates(config, bytes_per_element)`` made once."""
    tokens, keys, positions = ragged_sums(query_lens, context_lens)
    flops = (rates.linear_flops_per_token * tokens + rates.attention_flops_per_key * keys
             + rates.head_flops_per_row * num_logit_rows)
    nbytes = (rates.body_weight_bytes + (rates.head_weight_bytes if num_logit_rows else 0)
              + rates.kv_bytes_per_position * positions)
    return flops, nbytes


def step_cost(config: GPTConfig, batch: int = 1, new_tokens: int = 1, past: int = 0,
              bytes_per_element: int = 4, logits: str = "last", causal: bool = True) -> StepCost:
    """FLOPs and bytes of one forward call over ``new_tokens`` after ``past`` cached tokens.

    Prefill is ``past=0, new_tokens=T``; a decode step is ``new_tokens=1, past=context``.
    ``logits``: ``"last"`` (LM head on the last position, what prefill and decode need),
    ``"all"`` (every position, what training needs) or ``"none"``.
    """
    _check_positive(batch=batch, new_tokens=new_tokens, bytes_per_element=bytes_per_element)
    if logits not in ("last", "all", "none"):
        raise InputError(f"logits must be 'last', 'all' or 'none', got {logits!r}")
    if past < 0:
        raise InputError(f"past must be >= 0, got {past}")
    if past + new_tokens > config.n_positions:
        raise InputError(f"{past} cached + {new_tokens} new tokens exceed n_positions={config.n_positions}")
    n_logit_rows = {"last": batch, "all": batch * new_tokens, "none": 0}[logits]
    return batch_cost(config, [new_tokens] * batch, [past + new_tokens] * batch, n_logit_rows,
                      bytes_per_element, causal)


def prefill_cost(config: GPTConfig, prompt_len: int, batch: int = 1, **kw) -> StepCost:
    """:func:`step_cost` of prefilling a prompt of ``prompt_len`` tokens."""
    return step_cost(config, batch=batch, new_tokens=prompt_len, past=0, **kw)


def decode_cost(config: GPTConfig, context: int, batch: int = 1, **kw) -> StepCost:
    """:func:`step_cost` of one decode step with ``context`` tokens already in the cache."""
    return step_cost(config, batch=batch, new_tokens=1, past=context, **kw)


# --------------------------------------------------------------------------- one layer, op by op

#: FLOPs per element charged to the element-wise ops (a convention; the matmuls dominate).
ELEMENTWISE_FLOPS = {"layernorm": 8, "scale": 1, "mask": 1, "softmax": 5, "gelu": 8, "add": 1}


@dataclass
class OpRow:
    op: str
    inputs: str
    output: str
    flops: int
    bytes: int
    kind: str  # "matmul" or "elementwise"


def _shape(t) -> str:
    return "×".join(str(s) for s in t.shape)


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def layer_op_table(trace, layer: int, model) -> list[OpRow]:
    """Every op of block ``layer`` with input/output shapes, FLOPs and bytes, from the live trace.

    Shapes come from the recorded tensors; FLOPs use ``2·m·n·k`` for matmuls (+1 per output for a
    bias) and :data:`ELEMENTWISE_FLOPS` per element otherwise; bytes count each input, weight
    and output once at its element size. Introduced in notebooks/07_prefill.ipynb.
    """
    t = trace.layer(layer)
    needed = ("ln_1", "attn.q", "attn.k", "attn.v", "attn.scores", "attn.scaled", "attn.masked",
              "attn.weights", "attn.head_out", "attn.merged", "attn.out", "resid_mid", "ln_2",
              "mlp.pre_act", "mlp.hidden", "mlp.out", "resid_out")
    missing = [n for n in needed if n not in t]
    if missing:
        raise InputError(f"trace has no layer {layer} intermediates {missing}; run model(idx, trace=Trace())")
    block = model.transformer.h[layer]
    x_in = trace["embed.sum"] if layer == 0 else trace[f"h{layer - 1}.resid_out"]
    q, k, v = t["attn.q"], t["attn.k"], t["attn.v"]
    B, H, T, Dh = q.shape
    S = k.shape[2]
    D = H * Dh
    F = t["mlp.pre_act"].shape[-1]
    w_attn, w_o = block.attn.c_attn.weight, block.attn.c_proj.weight
    w_fc, w_pr = block.mlp.c_fc.weight, block.mlp.c_proj.weight
    ew = ELEMENTWISE_FLOPS
    rows = [
        OpRow("ln_1", _shape(x_in), _shape(t["ln_1"]), ew["layernorm"] * x_in.numel(),
              _nbytes(x_in, t["ln_1"]) + 2 * D * x_in.element_size(), "elementwise"),
        OpRow("qkv projection", f"{_shape(t['ln_1'])} @ {_shape(w_attn)}", f"3 × {_shape(q)}",
              gemm_flops(B * T, 3 * D, D) + B * T * 3 * D,
              _nbytes(t["ln_1"], w_attn, block.attn.c_attn.bias) + 3 * _nbytes(q), "matmul"),
        OpRow("scores q @ kᵀ", f"{_shape(q)} @ {_shape(k)}ᵀ", _shape(t["attn.scores"]),
              B * H * gemm_flops(T, S, Dh), _nbytes(q, k, t["attn.scores"]), "matmul"),
        OpRow("scale 1/√Dh", _shape(t["attn.scores"]), _shape(t["attn.scaled"]),
              ew["scale"] * t["attn.scaled"].numel(), _nbytes(t["attn.scores"], t["attn.scaled"]),
              "elementwise"),
        OpRow("causal mask", _shape(t["attn.scaled"]), _shape(t["attn.masked"]),
              ew["mask"] * t["attn.masked"].numel(), _nbytes(t["attn.scaled"], t["attn.masked"]),
              "elementwise"),
        OpRow("softmax (rows)", _shape(t["attn.masked"]), _shape(t["attn.weights"]),
              ew["softmax"] * t["attn.weights"].numel(), _nbytes(t["attn.masked"], t["attn.weights"]),
              "elementwise"),
        OpRow("weights @ v", f"{_shape(t['attn.weights'])} @ {_shape(v)}", _shape(t["attn.head_out"]),
              B * H * gemm_flops(T, Dh, S), _nbytes(t["attn.weights"], v, t["attn.head_out"]),
              "matmul"),
        OpRow("merge heads", _shape(t["attn.head_out"]), _shape(t["attn.merged"]), 0,
              _nbytes(t["attn.head_out"], t["attn.merged"]), "elementwise"),
        OpRow("W_o projection", f"{_shape(t['attn.merged'])} @ {_shape(w_o)}", _shape(t["attn.out"]),
              gemm_flops(B * T, D, D) + B * T * D,
              _nbytes(t["attn.merged"], w_o, block.attn.c_proj.bias, t["attn.out"]), "matmul"),
        OpRow("residual add", f"{_shape(x_in)} + {_shape(t['attn.out'])}", _shape(t["resid_mid"]),
              ew["add"] * t["resid_mid"].numel(), _nbytes(x_in, t["attn.out"], t["resid_mid"]), "elementwise"),
        OpRow("ln_2", _shape(t["resid_mid"]), _shape(t["ln_2"]), ew["layernorm"] * t["ln_2"].numel(),
              _nbytes(t["resid_mid"], t["ln_2"]) + 2 * D * x_in.element_size(), "elementwise"),
        OpRow("fc (D→F)", f"{_shape(t['ln_2'])} @ {_shape(w_fc)}", _shape(t["mlp.pre_act"]),
              gemm_flops(B * T, F, D) + B * T * F,
              _nbytes(t["ln_2"], w_fc, block.mlp.c_fc.bias, t["mlp.pre_act"]), "matmul"),
        OpRow("gelu", _shape(t["mlp.pre_act"]), _shape(t["mlp.hidden"]), ew["gelu"] * t["mlp.hidden"].numel(),
              _nbytes(t["mlp.pre_act"], t["mlp.hidden"]), "elementwise"),
        OpRow("proj (F→D)", f"{_shape(t['mlp.hidden'])} @ {_shape(w_pr)}", _shape(t["mlp.out"]),
              gemm_flops(B * T, D, F) + B * T * D,
              _nbytes(t["mlp.hidden"], w_pr, block.mlp.c_proj.bias, t["mlp.out"]), "matmul"),
        OpRow("residual add", f"{_shape(t['resid_mid'])} + {_shape(t['mlp.out'])}", _shape(t["resid_out"]),
              ew["add"] * t["resid_out"].numel(), _nbytes(t["resid_mid"], t["mlp.out"], t["resid_out"]),
              "elementwise"),
    ]
    return rows


def format_op_table(rows: list[OpRow]) -> str:
    """A fixed-width text table of :func:`layer_op_table` rows with a total line."""
    lines = [f"{'op':<16} {'input':<30} {'output':<16} {'FLOPs':>12} {'bytes':>11} {'FLOP/B':>7}"]
    for r in rows:
        ai = f"{r.flops / r.bytes:7.2f}" if r.bytes else "      -"
        lines.append(f"{r.op:<16} {r.inputs:<30} {r.output:<16} {r.flops:>12,} {r.bytes:>11,} {ai}")
    tf, tb = sum(r.flops for r in rows), sum(r.bytes for r in rows)
    lines.append(f"{'total':<16} {'':<30} {'':<16} {tf:>12,} {tb:>11,} {tf / tb:7.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- timing


def synchronize(device) -> None:
    """Wait for queued GPU work (a no-op on CPU): without it a GPU timing measures only the launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device="cpu", repeats: int = 5, warmup: int = 1) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn()`` after ``warmup`` calls; synchronised on a GPU."""
    if repeats < 1 or warmup < 0:
        raise InputError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


def graph_replay_seconds(graph, replays: int = 30) -> float:
    """Median seconds of one replay of a captured ``torch.cuda.CUDAGraph`` (CUDA events around each)."""
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def captured_seconds(fns, replays: int = 20) -> float:
    """Capture every callable of ``fns`` once, in order, into one CUDA graph (after a warm-up on a side
    stream) and return the median seconds of a replay: the GPU time of the kernels without the host's
    launch cost. The benchmarks time kernels this way."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    try:
        return graph_replay_seconds(graph, replays)
    finally:
        del graph


def median(xs) -> float:
    return float(statistics.median(xs))


def best(xs) -> float:
    """The fastest of several timings: noise from other programs only adds time."""
    return float(min(xs))


def device_name(device="cpu") -> str:
    """A human name of the device: the GPU's name, or the CPU model and its thread count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"{model} ({n} thread{'' if n == 1 else 's'})"


def device_slug(device="cpu") -> str:
    """:func:`device_name` made safe for a file name: ``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc-2t``."""
    dev = torch.device(device)
    name = device_name(dev)
    if dev.type == "cpu":
        name = "cpu " + re.sub(r" \((\d+) threads?\)", r" \1t", name)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass
class Ceilings:
    """The two measured limits of a device: peak matmul FLOP/s and memory bandwidth (bytes/s)."""

    device: str
    name: str
    dtype: str
    peak_flops: float
    bandwidth: float
    matmul_n: int
    copy_bytes: int
    samples: dict = field(default_factory=dict)

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOP/byte) where the two roofs meet."""
        return self.peak_flops / self.bandwidth

    def attainable(self, intensity: float) -> float:
        """The roofline: ``min(peak, bandwidth × intensity)``."""
        return min(self.peak_flops, self.bandwidth * intensity)

    def __str__(self):
        return (f"{self.name} [{self.dtype}]: peak matmul {self.peak_flops / 1e9:,.1f} GFLOP/s, "
                f"bandwidth {self.bandwidth / 1e9:,.1f} GB/s, ridge {self.ridge:.1f} FLOP/byte")


def timing_threads() -> int:
    """CPU threads to time with: ``COURSE_TIMING_THREADS`` if set, else 1 on a machine of <= 2 cores.

    On a small machine shared with other work, two busy-waiting BLAS threads fighting another
    process for two cores make timings swing tenfold; one thread gives steady numbers. Measure
    the ceilings and the model with the same setting so the roofline stays consistent.
    """
    env = os.environ.get("COURSE_TIMING_THREADS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise InputError(f"COURSE_TIMING_THREADS must be a positive integer, got {env!r}")
        return int(env)
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else cores


def default_dtype(device) -> torch.dtype:
    """fp32 on CPU, bf16 on a GPU: the dtype each device runs models in."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def measure_matmul_flops(device="cpu", dtype=None, n: int | None = None, repeats: int = 5) -> tuple[float, list]:
    """Peak FLOP/s of an ``n×n @ n×n`` matmul: ``2n³`` / the fastest of ``repeats`` runs.

    Defaults: n=1024 fp32 on CPU (tens of ms a run), n=8192 bf16 on a GPU.
    """
    dev = torch.device(device)
    dtype = dtype or default_dtype(dev)
    n = n or (8192 if dev.type == "cuda" else 1024)
    _check_positive(n=n)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    times = time_fn(lambda: a @ b, dev, repeats=repeats, warmup=1)
    return gemm_flops(n, n, n) / min(times), times


def measure_bandwidth(device="cpu", nbytes: int | None = None, repeats: int = 5) -> tuple[float, list]:
    """Memory bandwidth of a large copy: (bytes read + bytes written) / the fastest run.

    The buffer is filled first (untouched pages would be read from a shared zero page). Defaults:
    256 MiB on CPU (far beyond the caches), 2 GiB on a GPU.
    """
    dev = torch.device(device)
    nbytes = nbytes or ((2 << 30) if dev.type == "cuda" else (256 << 20))
    _check_positive(nbytes=nbytes)
    src = torch.ones(nbytes // 4, device=dev, dtype=torch.float32)
    dst = torch.zeros_like(src)
    times = time_fn(lambda: dst.copy_(src), dev, repeats=repeats, warmup=1)
    return 2 * src.numel() * 4 / min(times), times


def measure_read_bandwidth(device="cpu", nbytes: int | None = None, repeats: int = 5) -> tuple[float, list]:
    """Bandwidth of reading a large buffer once: bytes read / the fastest run.

    The buffer is a ``(rows, 1024)`` float32 matrix times a vector, the way a decode step streams a
    weight matrix. A copy also writes, and on a CPU a written line is usually read first, so a
    copy's counted bytes per second sit below what a read-only stream reaches. This is the
    ceiling for steps that mostly read, provided their data does not fit in a cache. Introduced in
    notebooks/10_prefill_vs_decode_on_your_hardware.ipynb. Defaults as :func:`measure_bandwidth`.
    """
    dev = torch.device(device)
    nbytes = nbytes or ((2 << 30) if dev.type == "cuda" else (256 << 20))
    _check_positive(nbytes=nbytes)
    cols = 1024
    rows = max(1, nbytes // (4 * cols))
    matrix = torch.ones(rows, cols, device=dev, dtype=torch.float32)          # (rows, 1024)
    vector = torch.ones(cols, device=dev, dtype=torch.float32)
    times = time_fn(lambda: matrix @ vector, dev, repeats=repeats, warmup=1)
    return matrix.numel() * 4 / min(times), times


def time_matmul(m: int, n: int, k: int, device="cpu", dtype=None, repeats: int = 5) -> float:
    """Best seconds of ``(m, k) @ (k, n)``: a GEMV when ``m == 1``, a GEMM otherwise."""
    _check_positive(m=m, n=n, k=k)
    dev = torch.device(device)
    dtype = dtype or default_dtype(dev)
    a = torch.randn(m, k, device=dev).to(dtype)
    w = torch.randn(k, n, device=dev).to(dtype)
    return best(time_fn(lambda: a @ w, dev, repeats=repeats, warmup=1))


def measure_ceilings(device="cpu", dtype=None, matmul_n: int | None = None,
                     copy_bytes: int | None = None, repeats: int = 5) -> Ceilings:
    """Both ceilings of ``device`` in about a second on a CPU (much less on a GPU)."""
    dev = torch.device(device)
    dtype = dtype or default_dtype(dev)
    matmul_n = matmul_n or (8192 if dev.type == "cuda" else 1024)
    copy_bytes = copy_bytes or ((2 << 30) if dev.type == "cuda" else (256 << 20))
    peak, mt = measure_matmul_flops(dev, dtype, matmul_n, repeats)
    bw, ct = measure_bandwidth(dev, copy_bytes, repeats)
    return Ceilings(device=str(dev), name=device_name(dev), dtype=str(dtype).replace("torch.", ""),
                    peak_flops=peak, bandwidth=bw, matmul_n=matmul_n, copy_bytes=copy_bytes,
                    samples={"matmul_s": mt, "copy_s": ct})


# --------------------------------------------------------------------------- timing the model


def bench_config(device="cpu") -> GPTConfig:
    """A GPT-2-like shape big enough that its weights do not fit in the caches.

    CPU: 8 layers, n_embd 512 (25M non-embedding parameters, 100 MB in fp32, over the 32 MB
    L3 of a typical server CPU). GPU: GPT-2 medium's shape (24 layers, 1024 wide, 50257 vocab).
    """
    if torch.device(device).type == "cuda":
        return GPTConfig(vocab_size=50257, n_positions=2048, n_embd=1024, n_layer=24, n_head=16)
    return GPTConfig(vocab_size=1024, n_positions=512, n_embd=512, n_layer=8, n_head=8)


def random_ids(config: GPTConfig, batch: int, length: int, device="cpu", seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=gen).to(device)


@torch.inference_mode()
def time_prefill(model, prompt_len: int, batch: int = 1, repeats: int = 3, warmup: int = 1) -> float:
    """Best seconds of ``model.prefill`` on a random prompt: the time to first token (TTFT)."""
    dev = model.transformer.wte.weight.device
    ids = random_ids(model.config, batch, prompt_len, dev)
    return best(time_fn(lambda: model.prefill(ids), dev, repeats, warmup))


def random_cache(config: GPTConfig, batch: int, context: int, device="cpu", dtype=torch.float32,
                 seed: int = 0):
    """A :class:`~course_lib.model.KVCache` of ``context`` positions filled with random keys/values.

    A decode step costs the same whatever numbers the cache holds, so timing it does not need
    a (slow) real prefill of ``batch × context`` tokens first.
    """
    from .model import KVCache

    _check_positive(batch=batch, context=context)
    gen = torch.Generator(device=device).manual_seed(seed)              # made where it is used
    shape = (batch, config.n_head, context, config.head_dim)            # (B, H, T, Dh)
    cache = KVCache()
    for layer in range(config.n_layer):
        k = torch.randn(shape, generator=gen, device=device).to(dtype)
        v = torch.randn(shape, generator=gen, device=device).to(dtype)
        cache.append(layer, k, v)
    return cache


@torch.inference_mode()
def time_decode_step(model, context: int, batch: int = 1, repeats: int = 5, warmup: int = 1,
                     use_cache: bool = True) -> float:
    """Best seconds of one decode step with ``context`` tokens before it (the TPOT there).

    With the cache: one token through :meth:`GPT.decode_step` on a cache of ``context`` random
    positions, reset to those positions before each repeat. Without: the whole ``context + 1``
    tokens recomputed, as a decoder without a KV cache must do for every new token.
    """
    w = model.transformer.wte.weight
    if context < 1:
        raise InputError(f"context must be >= 1 (decode follows a prefill), got {context}")
    ids = random_ids(model.config, batch, context + 1, w.device)
    if not use_cache:
        return best(time_fn(lambda: model(ids, last_only=True), w.device, repeats, warmup))
    cache = random_cache(model.config, batch, context, w.device, w.dtype)
    keys, values = list(cache.keys), list(cache.values)
    nxt = ids[:, context]

    def step():
        cache.keys, cache.values = list(keys), list(values)
        model.decode_step(nxt, cache)

    return best(time_fn(step, w.device, repeats, warmup))


class PreallocatedKVCache:
    """A KV cache with room for ``capacity`` positions reserved up front; a step writes one row.

    Same interface as :class:`~course_lib.model.KVCache` (``keys``, ``values``, ``seq_len``,
    ``append``), but ``append`` copies only the new rows into the reserved buffer and returns views
    of the filled part, as engines do. The reference ``KVCache`` appends with ``torch.cat``, which
    copies the whole cache every step; timing with this cache separates what attention costs from
    what the copy costs. Introduced in notebooks/08_decode_and_kv_cache.ipynb.
    """

    def __init__(self, config: GPTConfig, batch: int, capacity: int, device="cpu", dtype=torch.float32):
        _check_positive(batch=batch, capacity=capacity)
        shape = (batch, config.n_head, capacity, config.head_dim)                # (B, H, capacity, Dh)
        self._k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self._v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self._len = [0] * config.n_layer
        self.capacity = capacity

    @property
    def keys(self) -> list[torch.Tensor]:
        return [k[:, :, :n] for k, n in zip(self._k, self._len)]               # (B, H, S, Dh)

    @property
    def values(self) -> list[torch.Tensor]:
        return [v[:, :, :n] for v, n in zip(self._v, self._len)]

    @property
    def seq_len(self) -> int:
        return self._len[0]

    @property
    def batch_size(self) -> int:
        return self._k[0].shape[0]

    def append(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        """Write the new positions of ``layer`` (B, H, T_new, Dh); returns the filled keys and values."""
        start, t_new = self._len[layer], k_new.shape[2]
        if start + t_new > self.capacity:
            raise InputError(f"the cache has room for {self.capacity} positions; {start} are filled and "
                             f"{t_new} more do not fit: make it with a larger capacity")
        self._k[layer][:, :, start:start + t_new] = k_new
        self._v[layer][:, :, start:start + t_new] = v_new
        self._len[layer] = start + t_new
        return self._k[layer][:, :, :start + t_new], self._v[layer][:, :, :start + t_new]

    def truncate(self, seq_len: int) -> None:
        """Forget every position from ``seq_len`` on (the buffer stays reserved)."""
        self._len = [min(n, seq_len) for n in self._len]


def fill_preallocated_cache(config: GPTConfig, batch: int, context: int, device="cpu",
                            dtype=torch.float32, seed: int = 0, spare: int = 1) -> PreallocatedKVCache:
    """A :class:`PreallocatedKVCache` holding ``context`` random positions, with ``spare`` free ones."""
    src = random_cache(config, batch, context, device, dtype, seed)
    cache = PreallocatedKVCache(config, batch, context + spare, device, dtype)
    for layer, (k, v) in enumerate(zip(src.keys, src.values)):
        cache.append(layer, k, v)
    return cache


@torch.inference_mode()
def time_decode_step_preallocated(model, context: int, batch: int = 1, repeats: int = 5,
                                  warmup: int = 1) -> float:
    """Best seconds of one decode step on a :class:`PreallocatedKVCache` of ``context`` positions.

    Like :func:`time_decode_step`, without ``torch.cat`` copying the whole cache: what grows with
    the context here is attention reading the cached keys and values, nothing else.
    Introduced in notebooks/08_decode_and_kv_cache.ipynb.
    """
    w = model.transformer.wte.weight
    if context < 1:
        raise InputError(f"context must be >= 1 (decode follows a prefill), got {context}")
    cache = fill_preallocated_cache(model.config, batch, context, w.device, w.dtype)
    nxt = random_ids(model.config, batch, 1, w.device)[:, 0]

    def step():
        cache.truncate(context)
        model.decode_step(nxt, cache)

    return best(time_fn(step, w.device, repeats, warmup))


def time_decode_contexts(model, contexts, batch: int = 1, repeats: int = 9) -> dict[int, float]:
    """Best seconds of one decode step at each of ``contexts`` (preallocated caches, as
    :func:`time_decode_step_preallocated`), timed in turns: each repeat times one step at every
    context, so that a slow second of the machine (another program, the clock speed) lands on
    all contexts alike and the ratios between them stay honest. Introduced in
    notebooks/10_prefill_vs_decode_on_your_hardware.ipynb."""
    w = model.transformer.wte.weight
    contexts = list(contexts)
    if not contexts or any(c < 1 for c in contexts):
        raise InputError(f"contexts must be positive cache lengths, got {contexts}")
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    caches = {c: fill_preallocated_cache(model.config, batch, c, w.device, w.dtype) for c in contexts}
    nxt = random_ids(model.config, batch, 1, w.device)[:, 0]

    def step(c):
        caches[c].truncate(c)
        model.decode_step(nxt, caches[c])

    times = {c: [] for c in contexts}
    with torch.no_grad():
        for c in contexts:                      # warm-up
            step(c)
        for _ in range(repeats):
            for c in contexts:
                times[c] += time_fn(lambda: step(c), w.device, repeats=1, warmup=0)
    return {c: min(ts) for c, ts in times.items()}


def save_figures_enabled() -> bool:
    """True when ``COURSE_SAVE_FIGURES=1``: notebooks then write their key figures to figures/."""
    return os.environ.get("COURSE_SAVE_FIGURES", "") not in ("", "0")


def figure_path(stem: str, device="cpu"):
    """``figures/<stem>_<device-slug>.png`` in the repository (the folder is created)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "figures"
    root.mkdir(exist_ok=True)
    return root / f"{stem}_{device_slug(device)}.png"


def save_figure(fig, stem: str, device="cpu") -> str | None:
    """Save ``fig`` as :func:`figure_path` when :func:`save_figures_enabled`; returns the path."""
    if not save_figures_enabled():
        return None
    path = figure_path(stem, device)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    return str(path)


def achieved(cost: StepCost, seconds: float) -> dict:
    """Where a measured step lands on the roofline: intensity and achieved FLOP/s and bytes/s."""
    _check_positive(seconds=seconds)
    return {"intensity": cost.intensity, "flops_per_s": cost.total_flops / seconds,
            "bytes_per_s": cost.total_bytes / seconds, "seconds": seconds}
