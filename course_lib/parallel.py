"""Tensor and pipeline parallelism of the reference GPT over ``torch.distributed``.

Introduced in notebooks/13_many_devices.ipynb. Three ways to spread one model over several
devices, here several CPU processes that talk through ``torch.distributed`` with the gloo
backend (NCCL would take its place on GPUs):

* **tensor parallel** (:func:`shard_model`, :func:`tp_forward`): every rank holds the columns
  of ``c_attn`` and ``c_fc`` of its heads / MLP units ("column split") and the matching rows of
  the two output projections ("row split"); each rank's output projection gives a *partial sum*
  of the full output, so one ``all_reduce`` after attention and one after the MLP are the only
  synchronisation points of a layer. The KV cache is sharded by heads too.
* **pipeline parallel** (:func:`run_pipeline`): rank ``s`` holds a contiguous range of layers
  (:func:`stage_layers`); a batch is cut into micro-batches that flow from stage to stage with
  ``send``/``recv``. :func:`bubble_fraction` measures the idle share of a schedule,
  :func:`ideal_bubble` is the textbook ``(p - 1) / (m + p - 1)``.
* **chunk pipeline of one prompt** (:func:`run_chunk_pipeline`): a long prompt is cut into
  chunks; stage 1 works on chunk ``c`` with its own KV cache while stage 0 works on chunk
  ``c + 1``. It is exact because row ``i`` of layer ``L + 1`` needs only rows ``<= i`` of layer ``L``.

:func:`run_ranks` starts the worker processes (one thread each), sets up the process group on
``127.0.0.1`` at a free port, collects each rank's result and always ends the processes, on an
error or an interrupt too. Workers build their model from a :class:`ModelSpec`, so no weights
travel between processes; results come back as numpy arrays.
"""

from __future__ import annotations

import math
import os
import queue as queue_module
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from . import checkpoint
from .config import GPTConfig
from .errors import ConfigError, CourseError, InputError
from .model import GPT, KVCache, causal_mask, gelu

# --------------------------------------------------------------------------- which model


@dataclass(frozen=True)
class ModelSpec:
    """How a worker builds its copy of the model: the shipped tiny GPT, or random weights.

    ``ModelSpec.tiny()`` loads ``course_lib/assets/tiny-gpt``; ``ModelSpec.random(config, seed)``
    builds ``GPT(config)`` with GPT-2's initialisation from ``seed`` (the same numbers in every
    process). Always fp32 on the CPU.
    """

    kind: str
    config: dict | None = None
    seed: int = 0

    @classmethod
    def tiny(cls) -> "ModelSpec":
        return cls("tiny")

    @classmethod
    def random(cls, config: GPTConfig, seed: int = 0) -> "ModelSpec":
        if not isinstance(config, GPTConfig):
            raise InputError(f"ModelSpec.random needs a GPTConfig, got {type(config).__name__}")
        return cls("random", {k: v for k, v in vars(config).items()}, seed)

    def build(self) -> GPT:
        if self.kind == "tiny":
            from .tiny import TINY_DIR

            config, state = checkpoint.load_state(TINY_DIR)   # the weights only: no tokenizer needed
            model = GPT(config)                                # (on the meta device the first model of
            model.load_state_dict(state, strict=False)         # a fresh process costs seconds)
            return model.eval()
        model = GPT(self.gpt_config())
        model.reset_parameters(self.seed)
        return model.eval()

    def gpt_config(self) -> GPTConfig:
        """The model's config, without building the model."""
        if self.kind == "tiny":
            from .tiny import TINY_DIR

            return GPTConfig.load(TINY_DIR / "config.json")
        if self.kind == "random":
            return GPTConfig(**self.config)
        raise InputError(f"unknown model kind {self.kind!r}; use ModelSpec.tiny() or ModelSpec.random(config)")


# --------------------------------------------------------------------------- starting ranks


class WorkerError(CourseError):
    """A worker process raised, died or did not answer in time; the message has its traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_numpy(obj):
    """Tensors become numpy arrays (they pickle by value), containers are walked."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


def _rank_main(rank, world_size, port, fn, args, results, threads):
    """Body of one worker process: join the group, run ``fn``, report, leave the group."""
    report = None
    try:
        torch.set_num_threads(threads)
        if sys.platform.startswith("linux"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")      # stay on the loopback device
        elif sys.platform == "darwin":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=60))
        try:
            report = (rank, "ok", _to_numpy(fn(rank, world_size, *args)))
        except BaseException:  # noqa: BLE001 - everything goes back to the parent, which raises
            report = (rank, "error", traceback.format_exc())
        results.put(report)
        results.close()
        results.join_thread()     # delivered before the other ranks can notice this one leaving
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        if report is None:
            results.put((rank, "error", traceback.format_exc()))


def _context():
    import torch.multiprocessing as mp

    if sys.platform.startswith("linux") or sys.platform == "darwin":
        # A fork server imports torch once; each later worker is a cheap fork of it, and it never
        # ran the parent's thread pools (forking the notebook kernel itself would be unsafe).
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "course_lib.parallel", "course_lib.tiny"])
        return ctx
    return mp.get_context("spawn")


def run_ranks(fn, world_size: int = 2, args: tuple = (), timeout_s: float = 120.0, threads: int = 1) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; their results, by rank.

    Each process uses ``threads`` CPU threads and joins a gloo process group on 127.0.0.1.
    ``fn`` must be a module-level function (it is pickled); a script that calls this needs the
    ``if __name__ == "__main__":`` guard (the workers import the main module). If any rank raises, dies or the
    whole run takes longer than ``timeout_s``, every process is ended and :class:`WorkerError`
    is raised with the rank's traceback. The processes are always ended before this returns.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise InputError(f"world_size must be a positive integer, got {world_size!r}")
    if world_size > 8:
        raise InputError(f"world_size={world_size} processes is more than this course needs; use 2 to 8")
    if not callable(fn) or getattr(fn, "__qualname__", "").count("<locals>") or fn.__module__ == "__main__":
        raise InputError("fn must be a function defined at the top level of an importable module "
                         "(e.g. course_lib.parallel); functions typed into a notebook cannot be pickled")
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, results, threads), daemon=True)
             for r in range(world_size)]
    out: dict[int, object] = {}
    started = []
    try:
        for p in procs:
            p.start()
            started.append(p)
        deadline = time.monotonic() + timeout_s
        while len(out) < world_size:
            try:
                rank, status, value = results.get(timeout=0.2)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    raise WorkerError(f"worker rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                                      "before reporting a result") from None
                if time.monotonic() > deadline:
                    raise WorkerError(f"the workers did not finish within {timeout_s:.0f} s; they were "
                                      "stopped (a rank waiting for a message that never comes?)") from None
                continue
            if status == "error":
                raise WorkerError(f"worker rank {rank} raised:\n{value}")
            out[rank] = value
    finally:
        for p in started:
            p.join(timeout=5 if len(out) == world_size else 0.05)
        for p in started:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
        results.join_thread()
    return [out[r] for r in range(world_size)]


# --------------------------------------------------------------------------- tensor parallel


def check_tp_size(config: GPTConfig, world_size: int) -> None:
    """Raise :class:`ConfigError` unless ``world_size`` ranks can split the heads and the MLP evenly."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"the tensor-parallel size must be a positive integer, got {world_size!r}")
    if config.n_head % world_size:
        raise ConfigError(f"{world_size} ranks cannot split {config.n_head} attention heads evenly; "
                          f"choose a size that divides n_head, e.g. "
                          f"{[n for n in range(1, config.n_head + 1) if config.n_head % n == 0]}")
    if config.mlp_dim % world_size:
        raise ConfigError(f"{world_size} ranks cannot split the MLP width {config.mlp_dim} evenly; "
                          "choose a size that divides it")


@dataclass
class BlockShard:
    """One rank's share of a transformer block: its heads' columns and rows, LayerNorms copied.

    ``qkv_w`` (D, 3·D/N) holds the q, k and v columns of this rank's heads (column split);
    ``o_w`` (D/N, D) the matching rows of W_o (row split); ``fc_w`` (D, F/N) and ``proj_w``
    (F/N, D) likewise for the MLP. The output biases ``o_b`` and ``proj_b`` are whole: they are
    added once, after the partial sums are all-reduced.
    """

    layer_idx: int
    n_heads: int              # heads on this rank
    head_dim: int
    eps: float
    activation: str
    ln_1: tuple
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    o_w: torch.Tensor
    o_b: torch.Tensor
    ln_2: tuple
    fc_w: torch.Tensor
    fc_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor

    def nbytes(self) -> int:
        """Bytes of the sharded matrices and biases of this rank (LayerNorms left out)."""
        return sum(t.numel() * t.element_size() for t in (self.qkv_w, self.qkv_b, self.o_w, self.fc_w,
                                                          self.fc_b, self.proj_w))


def shard_block(block, rank: int, world_size: int) -> BlockShard:
    """Rank ``rank``'s share of ``block``: heads ``rank·H/N ..`` and MLP units ``rank·F/N ..``."""
    attn, mlp = block.attn, block.mlp
    D = attn.c_proj.weight.shape[0]
    H, Dh = attn.n_head, attn.head_dim
    F = mlp.c_fc.weight.shape[1]
    if H % world_size or F % world_size:
        raise ConfigError(f"{world_size} ranks cannot split {H} heads and an MLP of {F} evenly")
    if not 0 <= rank < world_size:
        raise InputError(f"rank must be in 0..{world_size - 1}, got {rank}")
    d_loc, f_loc = D // world_size, F // world_size
    cols = torch.cat([torch.arange(part * D + rank * d_loc, part * D + (rank + 1) * d_loc)
                      for part in range(3)])                           # this rank's q | k | v columns
    rows = slice(rank * d_loc, (rank + 1) * d_loc)
    units = slice(rank * f_loc, (rank + 1) * f_loc)
    with torch.no_grad():
        W_qkv, b_qkv = attn.c_attn.weight.detach(), attn.c_attn.bias.detach()
        return BlockShard(
            layer_idx=block.layer_idx, n_heads=H // world_size, head_dim=Dh,
            eps=block.ln_1.eps, activation=mlp.activation,
            ln_1=(block.ln_1.weight.detach().clone(), block.ln_1.bias.detach().clone()),
            qkv_w=W_qkv[:, cols].clone(), qkv_b=b_qkv[cols].clone(),         # (D, 3·D/N), (3·D/N,)
            o_w=attn.c_proj.weight.detach()[rows].clone(),                    # (D/N, D)
            o_b=attn.c_proj.bias.detach().clone(),
            ln_2=(block.ln_2.weight.detach().clone(), block.ln_2.bias.detach().clone()),
            fc_w=mlp.c_fc.weight.detach()[:, units].clone(),                  # (D, F/N)
            fc_b=mlp.c_fc.bias.detach()[units].clone(),
            proj_w=mlp.c_proj.weight.detach()[units].clone(),                 # (F/N, D)
            proj_b=mlp.c_proj.bias.detach().clone(),
        )


@dataclass
class TPShard:
    """One rank's model: embeddings, final norm and LM head copied, every block sharded."""

    config: GPTConfig
    rank: int
    world_size: int
    wte: torch.Tensor
    wpe: torch.Tensor
    ln_f: tuple
    blocks: list = field(default_factory=list)

    def nbytes(self) -> int:
        """Bytes of this rank's sharded block weights (what tensor parallelism divides by N)."""
        return sum(b.nbytes() for b in self.blocks)


def shard_model(model: GPT, rank: int, world_size: int) -> TPShard:
    """Rank ``rank`` of ``world_size``'s :class:`TPShard` of ``model``."""
    check_tp_size(model.config, world_size)
    t = model.transformer
    return TPShard(model.config, rank, world_size, t.wte.weight.detach().clone(), t.wpe.weight.detach().clone(),
                   (t.ln_f.weight.detach().clone(), t.ln_f.bias.detach().clone()),
                   [shard_block(b, rank, world_size) for b in t.h])


def attention_partial(shard: BlockShard, h: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
    """This rank's heads on ``h`` = ln_1(x) (B, T, D) → a partial sum (B, T, D) of the attention output.

    Summed over the ranks (the all-reduce) and added to ``o_b`` it is the full ``attn(h)``.
    """
    B, T, D = h.shape
    Hl, Dh = shard.n_heads, shard.head_dim
    qkv = torch.addmm(shard.qkv_b, h.reshape(-1, D), shard.qkv_w).view(B, T, 3, Hl, Dh)  # (B, T, 3, Hl, Dh)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))                          # (B, Hl, T, Dh)
    if kv_cache is not None:
        k, v = kv_cache.append(shard.layer_idx, k, v)                                    # (B, Hl, S, Dh)
    S = k.shape[2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(Dh)                                   # (B, Hl, T, S)
    scores = scores.masked_fill(~causal_mask(T, S, device=h.device), float("-inf"))
    merged = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, Hl * Dh)  # (B, T, D/N)
    return merged @ shard.o_w                                                            # (B, T, D)


def mlp_partial(shard: BlockShard, h: torch.Tensor) -> torch.Tensor:
    """This rank's MLP units on ``h`` = ln_2(x) (B, T, D) → a partial sum (B, T, D) of the MLP output."""
    hidden = gelu(h @ shard.fc_w + shard.fc_b, shard.activation)                        # (B, T, F/N)
    return hidden @ shard.proj_w                                                         # (B, T, D)


def _layer_norm(x, weight_bias, eps):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight_bias[0], weight_bias[1], eps)


def _embed(wte, wpe, idx, start):
    pos = torch.arange(start, start + idx.shape[1])
    return wte[idx] + wpe[pos]                                                           # (B, T, D)


class CommTimer:
    """Where a rank's time goes: intervals of compute and of all-reduce, and the bytes moved.

    ``intervals`` holds ``(kind, start, end)`` with ``kind`` in ``{"compute", "all_reduce"}`` and
    times from ``time.perf_counter``; ``allreduce_bytes`` the size of each all-reduced tensor.
    """

    def __init__(self):
        self.intervals: list[tuple[str, float, float]] = []
        self.allreduce_bytes: list[int] = []
        self._mark = time.perf_counter()

    def start(self) -> None:
        self._mark = time.perf_counter()

    def lap(self, kind: str) -> None:
        now = time.perf_counter()
        self.intervals.append((kind, self._mark, now))
        self._mark = now

    def total(self, kind: str) -> float:
        return sum(e - s for k, s, e in self.intervals if k == kind)


def _dist_all_reduce(t: torch.Tensor) -> None:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)


@torch.no_grad()
def tp_forward(shard: TPShard, idx: torch.Tensor, all_reduce=_dist_all_reduce, kv_cache: KVCache | None = None,
               timer: CommTimer | None = None, last_only: bool = False) -> torch.Tensor:
    """One rank's tensor-parallel forward of token ids ``idx`` (B, T): the full logits on every rank.

    ``all_reduce(t)`` sums ``t`` over the ranks in place (default: ``dist.all_reduce``); it is
    called twice per layer, after attention and after the MLP. ``kv_cache`` holds this rank's
    heads only, shape (B, H/N, S, Dh) per layer. ``timer`` records compute and all-reduce time.
    """
    start = kv_cache.seq_len if kv_cache is not None else 0
    if timer is not None:
        timer.start()
    x = _embed(shard.wte, shard.wpe, idx, start)                                        # (B, T, D)
    for blk in shard.blocks:
        for kind in ("attention", "mlp"):
            if kind == "attention":
                partial = attention_partial(blk, _layer_norm(x, blk.ln_1, blk.eps), kv_cache)
            else:
                partial = mlp_partial(blk, _layer_norm(x, blk.ln_2, blk.eps))
            if timer is not None:
                timer.lap("compute")
            all_reduce(partial)                                                          # the sync point
            if timer is not None:
                timer.lap("all_reduce")
                timer.allreduce_bytes.append(partial.numel() * partial.element_size())
            x = x + partial + (blk.o_b if kind == "attention" else blk.proj_b)
    x = _layer_norm(x, shard.ln_f, shard.config.layer_norm_epsilon)
    if last_only:
        x = x[:, -1]                                                                     # (B, D)
    logits = x @ shard.wte.T                                                             # (B, [T,] V)
    if timer is not None:
        timer.lap("compute")
    return logits


@torch.no_grad()
def tp_forward_in_one_process(model: GPT, idx, world_size: int = 2) -> torch.Tensor:
    """The tensor-parallel computation of ``world_size`` ranks, run one after the other here.

    Each layer's partial sums of all ranks are added up (what the all-reduce does) before
    any rank goes on. Same numbers as :func:`run_tensor_parallel`, without processes.
    """
    idx = model.check_token_ids(idx)
    shards = [shard_model(model, r, world_size) for r in range(world_size)]
    x = _embed(shards[0].wte, shards[0].wpe, idx, 0)
    for layer in range(model.config.n_layer):
        blks = [s.blocks[layer] for s in shards]
        x = x + sum(attention_partial(b, _layer_norm(x, b.ln_1, b.eps)) for b in blks) + blks[0].o_b
        x = x + sum(mlp_partial(b, _layer_norm(x, b.ln_2, b.eps)) for b in blks) + blks[0].proj_b
    return _layer_norm(x, shards[0].ln_f, model.config.layer_norm_epsilon) @ shards[0].wte.T


def _check_ids(model_or_config, ids) -> torch.Tensor:
    """``ids`` as a (B, T) long tensor on the CPU, checked as :meth:`GPT.check_token_ids` checks it."""
    if isinstance(model_or_config, GPTConfig):           # the same checks, without building a model
        from types import SimpleNamespace

        weight = SimpleNamespace(device=torch.device("cpu"))
        model_or_config = SimpleNamespace(config=model_or_config, transformer=SimpleNamespace(
            wte=SimpleNamespace(weight=weight)))
    return GPT.check_token_ids(model_or_config, ids).cpu()


def _tp_worker(rank, world_size, spec, prompt_ids, n_new, timing_lengths, repeats, allreduce_sizes):
    model = spec.build()
    ids = _check_ids(model, prompt_ids)
    shard = shard_model(model, rank, world_size)
    full_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if ".h." in n and not (".ln_" in n or n.endswith("c_proj.bias")))
    del model
    out = {"rank": rank, "shard_bytes": shard.nbytes(), "block_bytes": full_bytes}

    timer = CommTimer()
    out["logits"] = tp_forward(shard, ids, timer=timer)                      # (B, T, V), no cache
    out["n_allreduce"] = len(timer.allreduce_bytes)
    out["allreduce_bytes"] = list(timer.allreduce_bytes)

    cache = KVCache()                                                         # this rank's heads only
    logits = tp_forward(shard, ids, kv_cache=cache, last_only=True)
    tokens = []
    for step in range(n_new):
        nxt = logits.argmax(-1)                                               # (B,)
        tokens.append(nxt)
        if step < n_new - 1:
            logits = tp_forward(shard, nxt[:, None], kv_cache=cache, last_only=True)
    out["tokens"] = torch.stack(tokens, 1) if tokens else torch.zeros(ids.shape[0], 0, dtype=torch.long)
    out["cache_shape"] = tuple(cache.keys[0].shape)
    out["cache_keys"] = list(cache.keys)

    def bare_allreduce(nbytes: int) -> float:
        """Best seconds of one all-reduce of ``nbytes``, both ranks starting together (no waiting)."""
        buf = torch.ones(max(1, nbytes // 4))
        times = []
        for _ in range(max(repeats, 10)):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            times.append(time.perf_counter() - t0)
        return min(times)

    timing = []
    for T in timing_lengths:
        x_ids = torch.randint(0, shard.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
        best = None
        for _ in range(repeats):
            dist.barrier()
            t = CommTimer()
            t0 = time.perf_counter()
            tp_forward(shard, x_ids, timer=t, last_only=True)
            wall = time.perf_counter() - t0
            row = {"T": T, "wall": wall, "compute": t.total("compute"), "all_reduce": t.total("all_reduce"),
                   "bytes_per_allreduce": t.allreduce_bytes[0], "n_allreduce": len(t.allreduce_bytes)}
            if best is None or wall < best["wall"]:
                best = row
        # Inside the forward, an all-reduce also holds the time this rank waits for the slower one.
        # The transfer alone: the same all-reduce with both ranks starting together, times the count.
        best["transfer"] = bare_allreduce(best["bytes_per_allreduce"]) * best["n_allreduce"]
        best["waiting"] = max(0.0, best["all_reduce"] - best["transfer"])
        timing.append(best)
    out["timing"] = timing
    sizes = sorted({int(n) for n in allreduce_sizes} | {r["bytes_per_allreduce"] for r in timing})
    out["allreduce_bench"] = [{"bytes": n, "seconds": bare_allreduce(n)} for n in sizes]
    return out


def run_tensor_parallel(spec: ModelSpec, prompt_ids, n_new: int = 8, world_size: int = 2,
                        timing_lengths=(), repeats: int = 3, allreduce_sizes=(), timeout_s: float = 120.0) -> list:
    """Tensor-parallel run of ``spec`` on ``world_size`` processes; one result dict per rank.

    Each rank: the full logits of ``prompt_ids`` (B, T, V) and the bytes of each of its
    all-reduces; ``n_new`` greedy tokens decoded with a KV cache sharded by heads; for each
    prompt length in ``timing_lengths`` the best of ``repeats`` forwards split into ``compute``
    and ``all_reduce`` seconds, the all-reduce part split again into ``transfer`` (bare
    all-reduces of the same size with both ranks starting together) and ``waiting`` (the rest:
    this rank waiting for the other); and the best time of one bare all-reduce of each size in
    ``allreduce_sizes`` and of each forward's size (``allreduce_bench``).
    """
    config = spec.gpt_config()
    check_tp_size(config, world_size)
    _check_ids(config, prompt_ids)
    if not isinstance(n_new, int) or n_new < 0:
        raise InputError(f"n_new must be a non-negative integer, got {n_new!r}")
    if torch.as_tensor(prompt_ids).shape[-1] + n_new > config.n_positions:
        raise InputError(f"the prompt plus n_new={n_new} tokens exceeds the context of {config.n_positions}")
    for T in timing_lengths:
        if not 1 <= T <= config.n_positions:
            raise InputError(f"timing length {T} must be in 1..{config.n_positions}")
    return run_ranks(_tp_worker, world_size, (spec, prompt_ids, n_new, tuple(timing_lengths), repeats,
                                              tuple(allreduce_sizes)), timeout_s)


# --------------------------------------------------------------------------- pipeline parallel


def stage_layers(n_layer: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, as even as possible: ``8, 2 → [0..3], [4..7]``."""
    if isinstance(n_stages, bool) or not isinstance(n_stages, int) or n_stages < 1:
        raise InputError(f"the number of stages must be a positive integer, got {n_stages!r}")
    if n_stages > n_layer:
        raise InputError(f"{n_stages} stages need at least {n_stages} layers; the model has {n_layer}")
    bounds = [round(s * n_layer / n_stages) for s in range(n_stages + 1)]
    return [range(bounds[s], bounds[s + 1]) for s in range(n_stages)]


@dataclass
class StageCache(KVCache):
    """A :class:`KVCache` for the layers of one pipeline stage: layer ``first_layer`` is entry 0."""

    first_layer: int = 0

    def append(self, layer: int, k_new, v_new):
        return super().append(layer - self.first_layer, k_new, v_new)


def ideal_bubble(n_stages: int, n_micro: int) -> float:
    """The idle share of a pipeline of ``p`` equal stages and ``m`` micro-batches: (p − 1)/(m + p − 1)."""
    for name, v in (("n_stages", n_stages), ("n_micro", n_micro)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    return (n_stages - 1) / (n_micro + n_stages - 1)


def ideal_schedule(n_stages: int, n_micro: int, stage_time: float = 1.0) -> list[tuple[int, int, float, float]]:
    """The forward schedule of ``m`` micro-batches through ``p`` stages, each step ``stage_time``.

    Simulated, not from a formula: stage ``s`` starts micro-batch ``j`` when it has finished
    micro-batch ``j - 1`` and stage ``s - 1`` has finished micro-batch ``j``. Returns
    ``(stage, micro_batch, start, end)`` rows, the format :func:`run_pipeline` measures.
    """
    ideal_bubble(n_stages, n_micro)
    done = {}
    rows = []
    for s in range(n_stages):
        for j in range(n_micro):
            start = max(done.get((s, j - 1), 0.0), done.get((s - 1, j), 0.0))
            done[(s, j)] = start + stage_time
            rows.append((s, j, start, start + stage_time))
    return rows


def bubble_fraction(intervals, n_stages: int) -> float:
    """Idle share of a schedule: idle / (p × makespan), from ``(stage, item, start, end)`` rows.

    The makespan runs from the earliest start to the latest end over all stages; a stage is
    idle whenever none of its intervals covers the moment.
    """
    rows = list(intervals)
    if not rows:
        raise InputError("bubble_fraction needs at least one (stage, item, start, end) interval")
    t0 = min(r[2] for r in rows)
    t1 = max(r[3] for r in rows)
    makespan = t1 - t0
    if makespan <= 0:
        raise InputError("the intervals have no duration")
    busy = 0.0
    for s in range(n_stages):
        spans = sorted((r[2], r[3]) for r in rows if r[0] == s)
        end = -math.inf
        for a, b in spans:                      # the union of the stage's intervals
            a = max(a, end)
            if b > a:
                busy += b - a
            end = max(end, b)
    return (n_stages * makespan - busy) / (n_stages * makespan)


def common_start() -> float:
    """A barrier, then the earliest ``time.perf_counter()`` of all ranks: their common time zero.

    ``perf_counter`` reads the host's monotonic clock, the same in every process of one machine,
    so each rank's timestamps minus this zero lie on one time axis. (Timing from each rank's own
    exit of the barrier would not: a rank the OS schedules later starts its clock later.)
    """
    dist.barrier()
    t0 = torch.tensor([time.perf_counter()], dtype=torch.float64)
    dist.all_reduce(t0, op=dist.ReduceOp.MIN)
    return float(t0)


class _Prefetcher:
    """Receives a stage's inputs one by one, the next one always already posted (``irecv``).

    Posting the receive of item ``j + 1`` before computing item ``j`` lets the transfer happen
    while this stage computes, instead of starting only when it asks for the data.
    """

    def __init__(self, shapes, src: int):
        self.shapes, self.src, self.pending = list(shapes), src, {}
        self._post(0)

    def _post(self, j):
        if j < len(self.shapes):
            buf = torch.empty(self.shapes[j])
            self.pending[j] = (buf, dist.irecv(buf, src=self.src))

    def get(self, j) -> torch.Tensor:
        buf, req = self.pending.pop(j)
        req.wait()                                   # waiting for the stage before is idle time
        self._post(j + 1)
        return buf


def _stage_forward(model, layers, x, cache=None):
    for i in layers:
        x = model.transformer.h[i](x, cache)
    return x


def _pipeline_worker(rank, world_size, spec, batch_ids, micro_counts, repeats):
    torch.manual_seed(0)
    model = spec.build()
    ids = _check_ids(model, batch_ids)
    B, T = ids.shape
    D = model.config.n_embd
    layers = stage_layers(model.config.n_layer, world_size)[rank]
    first, last = rank == 0, rank == world_size - 1
    runs = []
    with torch.no_grad():
        for m in micro_counts:
            pieces = torch.tensor_split(torch.arange(B), m)
            tries = []
            for _ in range(repeats):
                t0 = common_start()                       # one time axis for all ranks
                rows, logits, sends = [], [], []
                inbox = None if first else _Prefetcher([(len(r), T, D) for r in pieces], rank - 1)
                for j, rows_j in enumerate(pieces):
                    if first:
                        a = time.perf_counter()
                        x = model.transformer.wte(ids[rows_j]) + model.transformer.wpe(torch.arange(T))
                    else:
                        x = inbox.get(j)
                        a = time.perf_counter()
                    x = _stage_forward(model, layers, x)  # (b, T, D)
                    if last:
                        logits.append(model.lm_head(model.transformer.ln_f(x[:, -1])))   # (b, V)
                    b = time.perf_counter()
                    if not last:
                        sends.append(dist.isend(x.contiguous(), dst=rank + 1))
                    rows.append((rank, j, a - t0, b - t0))
                for s in sends:
                    s.wait()
                tries.append({"intervals": rows, "logits": torch.cat(logits) if last else None})
            runs.append(tries)
    return runs


def run_pipeline(spec: ModelSpec, batch_ids, micro_counts=(1, 2, 4, 8), world_size: int = 2, repeats: int = 3,
                 timeout_s: float = 120.0) -> list[dict]:
    """Pipeline-parallel prefill of a batch on ``world_size`` stage processes.

    For each ``m`` in ``micro_counts`` the batch (B, T) is cut into ``m`` micro-batches that
    flow through the stages; every stage timestamps each micro-batch (``time.perf_counter``
    on one clock, see :func:`common_start`). Per ``m``: ``intervals`` ``(stage, micro_batch, start, end)`` of
    the repeat whose whole schedule was shortest (``makespans`` lists all), and the last-position ``logits`` (B, V).
    """
    config = spec.gpt_config()
    ids = _check_ids(config, batch_ids)
    stage_layers(config.n_layer, world_size)
    for m in micro_counts:
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= ids.shape[0]:
            raise InputError(f"micro-batch count {m!r} must be an integer in 1..{ids.shape[0]} (the batch size)")
    per_rank = run_ranks(_pipeline_worker, world_size, (spec, ids, tuple(micro_counts), repeats), timeout_s)
    out = []
    for k, m in enumerate(micro_counts):
        tries = [sorted(r for rank in per_rank for r in rank[k][i]["intervals"]) for i in range(repeats)]
        i = _shortest(tries)
        out.append({"n_micro": m, "intervals": tries[i], "logits": per_rank[-1][k][i]["logits"],
                    "makespans": [_makespan(t) for t in tries]})
    return out


def _makespan(intervals) -> float:
    return max(r[3] for r in intervals) - min(r[2] for r in intervals)


def _shortest(tries) -> int:
    """The repeat whose whole schedule (all stages, one common clock) was shortest."""
    return min(range(len(tries)), key=lambda i: _makespan(tries[i]))


# --------------------------------------------------------------------------- one prompt, in chunks


def _chunk_worker(rank, world_size, spec, prompt_ids, n_chunks, repeats):
    model = spec.build()
    ids = _check_ids(model, prompt_ids)
    T, D = ids.shape[1], model.config.n_embd
    layers = stage_layers(model.config.n_layer, world_size)[rank]
    first, last = rank == 0, rank == world_size - 1
    bounds = [round(c * T / n_chunks) for c in range(n_chunks + 1)]
    tries = []
    with torch.no_grad():
        for _ in range(repeats):
            cache = StageCache(first_layer=layers.start)
            t0 = common_start()
            rows, sends, logits = [], [], None
            inbox = None if first else _Prefetcher([(1, bounds[c + 1] - bounds[c], D) for c in range(n_chunks)],
                                                   rank - 1)
            for c in range(n_chunks):
                lo, hi = bounds[c], bounds[c + 1]
                if first:
                    a = time.perf_counter()
                    x = model.transformer.wte(ids[:, lo:hi]) + model.transformer.wpe(torch.arange(lo, hi))
                else:
                    x = inbox.get(c)
                    a = time.perf_counter()
                x = _stage_forward(model, layers, x, cache)        # rows lo..hi-1 of this stage's layers
                if last and c == n_chunks - 1:
                    logits = model.lm_head(model.transformer.ln_f(x[:, -1]))    # (1, V)
                b = time.perf_counter()
                if not last:
                    sends.append(dist.isend(x.contiguous(), dst=rank + 1))
                rows.append((rank, c, a - t0, b - t0))
            for s in sends:
                s.wait()
            tries.append({"intervals": rows, "logits": logits, "keys": cache.keys, "values": cache.values})
    return {"tries": tries, "layers": list(layers), "bounds": bounds}


def run_chunk_pipeline(spec: ModelSpec, prompt_ids, n_chunks: int = 4, world_size: int = 2, repeats: int = 3,
                       timeout_s: float = 120.0) -> dict:
    """Prefill of one prompt cut into ``n_chunks`` chunks, its layers split over ``world_size`` stages.

    Stage ``s`` runs chunk ``c`` through its layers with its own KV cache and sends the rows on;
    meanwhile stage ``s - 1`` already works on chunk ``c + 1``. Returns ``intervals``
    ``(stage, chunk, start, end)`` (best repeat), the last position's ``logits`` (1, V), and the
    filled cache of every layer (``keys``, ``values``: lists over all layers, (1, H, T, Dh) each).
    """
    config = spec.gpt_config()
    ids = _check_ids(config, prompt_ids)
    if ids.shape[0] != 1:
        raise InputError(f"the chunk pipeline follows one prompt; got a batch of {ids.shape[0]}")
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or not 1 <= n_chunks <= ids.shape[1]:
        raise InputError(f"n_chunks must be an integer in 1..{ids.shape[1]} (the prompt length), got {n_chunks!r}")
    stage_layers(config.n_layer, world_size)
    per_rank = run_ranks(_chunk_worker, world_size, (spec, ids, n_chunks, repeats), timeout_s)
    tries = [sorted(r for rank in per_rank for r in rank["tries"][i]["intervals"]) for i in range(repeats)]
    i = _shortest(tries)
    return {"intervals": tries[i], "logits": per_rank[-1]["tries"][i]["logits"], "bounds": per_rank[0]["bounds"],
            "keys": [k for rank in per_rank for k in rank["tries"][i]["keys"]],
            "values": [v for rank in per_rank for v in rank["tries"][i]["values"]],
            "makespans": [_makespan(t) for t in tries]}


def overlap_seconds(intervals, stage_a: int, stage_b: int) -> float:
    """Total time during which stage ``stage_a`` and stage ``stage_b`` were both busy."""
    a = [(r[2], r[3]) for r in intervals if r[0] == stage_a]
    b = [(r[2], r[3]) for r in intervals if r[0] == stage_b]
    return float(sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b))
