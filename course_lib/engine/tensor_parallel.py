"""Tensor parallelism: one model's layers split over N ranks, one process (and one GPU) each.

``LLM(..., tensor_parallel_size=N)``. Rank 0 is the calling process: it keeps the scheduler,
the block manager, the sampler and the ledger exactly as with one rank. Ranks 1..N-1 are worker
processes the engine starts (``spawn``); they only run forwards. The split, column then row:

* **attention**: rank ``r`` holds heads ``r*H/N .. (r+1)*H/N - 1``: the columns of ``c_attn``
  that make their q, k and v, and the same rows of ``c_proj``. Its heads' outputs times those rows
  are one term of the projection's sum over heads, so the ranks' outputs add up to the whole.
* **MLP**: columns ``r*F/N ..`` of ``c_fc`` (GELU is elementwise: each rank applies it to its own
  columns) and the same rows of the MLP's ``c_proj``.
* the biases of the two row-split layers are added once, on rank 0 (zeros elsewhere); embeddings,
  LayerNorms and the LM head are replicated.
* the **KV pool** of a rank holds its heads only, under the same block ids on every rank: rank
  0's block manager decides and every rank writes the same slots.

Each step rank 0 broadcasts the flat batch (batch.py: a 5-number header, then the arrays packed
in one int64 tensor) and every rank runs the same forward (runner.py), summing partial outputs
with an all-reduce after attention's output projection and after the MLP — the two
synchronisation points of a layer. Rank 0 computes the logits and samples. The transport is
``torch.distributed``: gloo for the step's arrays (host memory) and, on CPU, the all-reduces; NCCL
for the all-reduces on CUDA (rank ``r`` on ``cuda:r``), inside the CUDA graphs when they are on.

Failures. A Ctrl-C is held until the step's forward has ended on every rank (the workers ignore
SIGINT), so an interrupted step rolls back as with one rank. Any other failure in the middle of
a forward — an exception on a worker, a worker that dies, an error on rank 0 — leaves the ranks
out of step (some wait in an all-reduce the others will never reach). The engine does not try
to rejoin them: it stops the workers, raises :class:`TensorParallelError` with the failed rank's
traceback, and refuses later steps with a message to create a new ``LLM``. Workers exit on
:meth:`TensorParallelGroup.shutdown` (called by ``LLM.shutdown()``, at garbage collection and at
interpreter exit), and by themselves when rank 0's process dies. Scripts that create a
tensor-parallel LLM need the usual ``if __name__ == "__main__":`` guard of ``spawn``.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import wait as wait_for_any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..model import GPT
from .batch import FlatBatch
from .config import EngineConfig
from .runner import build_runner

START_TIMEOUT = 120.0                               # seconds for the workers to load, connect and capture
STEP_TIMEOUT = datetime.timedelta(minutes=5)        # an all-reduce that waits longer fails
IDLE_TIMEOUT = datetime.timedelta(days=3650)        # a worker waits for the next step as long as rank 0 lives
STEP, STOP, FAULT = 1, 2, 3                         # commands in the step header
HEADER = 5                                          # command, N tokens, B requests, M blocks, single rows


class TensorParallelError(RuntimeError):
    """A rank failed; the engine's ranks are out of step and it serves no more steps."""


# ---------------------------------------------------------------------------------- sharding
def shard_state(model: GPT, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s weights of ``model`` (our parameter names, no lm_head), each a new
    contiguous tensor: heads and MLP columns split, everything else replicated."""
    cfg = model.config
    D, F = cfg.n_embd, cfg.mlp_dim
    heads = slice(rank * D // world, (rank + 1) * D // world)     # this rank's heads' dims of q, k, v (n_head/N heads)
    cols = slice(rank * F // world, (rank + 1) * F // world)      # this rank's MLP columns
    state = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        p = p.detach()
        if name.endswith("attn.c_attn.weight"):
            p = p.view(D, 3, D)[:, :, heads].reshape(D, 3 * D // world)          # (D, 3 D/N): its q | k | v
        elif name.endswith("attn.c_attn.bias"):
            p = p.view(3, D)[:, heads].reshape(3 * D // world)
        elif name.endswith("attn.c_proj.weight"):
            p = p[heads]                                                          # (D/N, D): its rows of W_o
        elif name.endswith("mlp.c_fc.weight"):
            p = p[:, cols]                                                        # (D, F/N)
        elif name.endswith("mlp.c_fc.bias"):
            p = p[cols]
        elif name.endswith("mlp.c_proj.weight"):
            p = p[cols]                                                           # (F/N, D)
        elif name.endswith("c_proj.bias") and rank != 0:
            p = torch.zeros_like(p)                                               # added once, on rank 0
        state[name] = p.contiguous().clone()
    return state


def shard_model(model_config, state: dict[str, torch.Tensor], device, dtype) -> GPT:
    """A :class:`GPT` whose parameters are one rank's shard (shapes smaller than the config's
    where split); the runner reads its heads from the KV pool (runner.build_runner)."""
    model = GPT(model_config, device="meta")
    for name, tensor in state.items():
        module_name, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(module_name), leaf,
                torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
    model.lm_head.weight = model.transformer.wte.weight
    return model.eval()


def pack(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[tuple[str, tuple[int, ...]]]]:
    """All tensors in one flat buffer (one shared-memory handle to pass to a worker, not hundreds)."""
    layout = [(name, tuple(t.shape)) for name, t in state.items()]
    return torch.cat([t.reshape(-1) for t in state.values()]), layout


def unpack(flat: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    parts = flat.split([int(np.prod(shape)) for _, shape in layout])
    return {name: part.view(shape) for (name, shape), part in zip(layout, parts)}


# ---------------------------------------------------------------------------------- collectives
class Collectives:
    """One rank's two process groups: ``control`` (gloo: rank 0 broadcasts each step's arrays)
    and ``data`` (the all-reduces: gloo on CPU, NCCL on CUDA)."""

    def __init__(self, store: dist.Store, rank: int, world: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world, device
        self.control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, world, IDLE_TIMEOUT)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = STEP_TIMEOUT
            self.data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, world, options)
        else:
            self.data = dist.ProcessGroupGloo(dist.PrefixStore("data", store), rank, world, STEP_TIMEOUT)

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum ``partial`` over the ranks, in place; every rank gets the sum."""
        dist.all_reduce(partial, group=self.data)
        return partial

    # rank 0
    def send(self, command: int, flat: FlatBatch | None = None, target: int = 0) -> None:
        header = torch.zeros(HEADER, dtype=torch.long)
        header[0], header[1] = command, target
        if flat is not None:
            header[1:] = torch.tensor([flat.num_tokens, flat.num_seqs, flat.block_tables.shape[1],
                                       flat.num_single_rows])
        self.control.broadcast(header, 0).wait()
        if flat is not None:
            arrays = [flat.input_ids, flat.positions, flat.slot_mapping, flat.query_start, flat.context_lens,
                      flat.block_tables.ravel()]
            self.control.broadcast(torch.from_numpy(np.concatenate(arrays)), 0).wait()

    # ranks 1..N-1
    def receive(self) -> tuple[int, FlatBatch | int]:
        """The next command and, for a step, its flat batch (no logit rows: only rank 0 samples);
        for another command the rank it is meant for (0: all)."""
        header = torch.zeros(HEADER, dtype=torch.long)
        self.control.broadcast(header, 0).wait()
        command, N, B, M, single = header.tolist()
        if command != STEP:
            return command, N
        packed = torch.zeros(3 * N + (B + 1) + B + B * M, dtype=torch.long)
        self.control.broadcast(packed, 0).wait()
        ids, pos, slots, qs, ctx, tables = np.split(packed.numpy(), np.cumsum([N, N, N, B + 1, B]))
        return command, FlatBatch(seqs=[], input_ids=ids, positions=pos, slot_mapping=slots, query_start=qs,
                                  context_lens=ctx, block_tables=tables.reshape(B, M),
                                  logits_indices=np.zeros(0, dtype=np.int64), num_single_rows=single)

    def close(self) -> None:
        for group in (self.data, self.control):
            try:
                group.shutdown()
            except Exception:               # already broken by a failed peer: nothing left to release
                pass


# ---------------------------------------------------------------------------------- a worker
def worker_main(rank: int, port: int, weights: torch.Tensor, layout, model_config, config: EngineConfig,
                num_kv_blocks: int, pipe, parent_pid: int, num_threads: int) -> None:
    """Rank ``rank`` (>= 1): build its shard, then run every step rank 0 broadcasts until STOP.
    Reports ``("loaded",)``, ``("ready",)`` or ``("error", traceback)`` through ``pipe``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # a Ctrl-C is rank 0's to handle
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    collectives = None
    try:
        torch.set_num_threads(num_threads)
        device = torch.device("cpu")
        if config.device.type == "cuda":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        model = shard_model(model_config, unpack(weights, layout), device, config.dtype)
        del weights
        pipe.send(("loaded",))
        store = dist.TCPStore("127.0.0.1", port, config.tensor_parallel_size, is_master=False,
                              timeout=datetime.timedelta(seconds=START_TIMEOUT))
        collectives = Collectives(store, rank, config.tensor_parallel_size, device)
        runner = build_runner(model, config, num_kv_blocks, tp=collectives)
        pipe.send(("ready",))
        fault = False                                       # told to fail its next step (FAULT, for tests)
        while True:
            command, payload = collectives.receive()
            if command == STOP:
                break
            if command == FAULT:
                fault = payload == rank
            elif command == STEP:
                if fault:                                   # rank 0 waits for us in the step's first all-reduce
                    raise RuntimeError(f"fault injected on rank {rank} (TensorParallelGroup.inject_fault)")
                runner.execute(payload)
                if device.type == "cuda":
                    torch.cuda.synchronize()               # a failure in this step surfaces in this step
    except BaseException:
        try:
            pipe.send(("error", traceback.format_exc()))
        except OSError:                                     # rank 0 is gone
            pass
        os._exit(1)                                         # closes its sockets: rank 0's collective fails at once
    if collectives is not None:
        collectives.close()
    os._exit(0)


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:                      # rank 0 died (we were re-parented)
            os._exit(1)


# ---------------------------------------------------------------------------------- rank 0
class TensorParallelGroup:
    """Rank 0's handle on the group: starts the workers, runs steps on every rank, stops them.

    ``runner`` is rank 0's own :class:`~course_lib.engine.runner.ModelRunner` (its shard)."""

    def __init__(self, model: GPT, config: EngineConfig, num_kv_blocks: int):
        world = config.tensor_parallel_size
        self.rank, self.world_size = 0, world
        self.failure: str | None = None
        self.processes, self.pipes = [], []
        self.reports: dict[int, str] = {}                 # rank -> its error, as it told us
        self.collectives = None
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=START_TIMEOUT))      # port 0: a free one
        context = mp.get_context("spawn")
        try:
            for rank in range(1, world):
                weights, layout = pack(shard_state(model, rank, world))
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(
                    target=worker_main, name=f"course-tp-rank{rank}", daemon=True,
                    args=(rank, store.port, weights.cpu(), layout, model.config, config, num_kv_blocks, sender,
                          os.getpid(), torch.get_num_threads()))
                process.start()
                sender.close()
                self.processes.append(process)
                self.pipes.append(receiver)
            self._wait_for("loaded")
            self.collectives = Collectives(store, 0, world, config.device)
            shard = shard_model(model.config, shard_state(model, 0, world), config.device, config.dtype)
            self.runner = build_runner(shard, config, num_kv_blocks, tp=self.collectives)
            self._wait_for("ready")
        except BaseException as e:
            error = self.fail(e, "while starting")
            raise error from (None if isinstance(e, TensorParallelError) else e)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    # ------------------------------------------------------------------ steps
    def check_usable(self) -> None:
        if self.failure is not None:
            raise TensorParallelError(self.failure)

    def execute(self, runner, flat: FlatBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Broadcast the step, run rank 0's share of it, return what :meth:`ModelRunner.execute`
        returns (the logits ``(R, V)``, the greedy tokens or ``None``). A failure anywhere stops the
        group and raises :class:`TensorParallelError`."""
        self.check_usable()
        try:
            self.collectives.send(STEP, flat)
            result = runner.execute(flat)
            if self.collectives.device.type == "cuda":
                self._wait_for_gpu()
        except BaseException as e:
            raise self.fail(e, "in a step") from e
        return result

    def inject_fault(self, rank: int) -> None:
        """Make worker ``rank`` raise in its next step (for the tests of failure handling)."""
        if not 1 <= rank < self.world_size:
            raise ValueError(f"rank must be a worker, 1..{self.world_size - 1}; got {rank}")
        self.check_usable()
        self.collectives.send(FAULT, target=rank)

    def _wait_for_gpu(self) -> None:
        """Wait for the step's kernels while watching the workers: a dead rank leaves rank 0's
        NCCL kernels waiting for ever, so abort them instead."""
        done = torch.cuda.Event()
        done.record()
        start = time.monotonic()
        while not done.query():
            if wait_for_any(self.pipes + [p.sentinel for p in self.processes], timeout=0.001):
                self.collectives.data.abort()
                raise TensorParallelError("a worker stopped during the step")
            if time.monotonic() - start > STEP_TIMEOUT.total_seconds():
                self.collectives.data.abort()
                raise TensorParallelError(f"the step took over {STEP_TIMEOUT}; a rank hangs")

    # ------------------------------------------------------------------ failure and shutdown
    def _wait_for(self, what: str) -> None:
        """Until every worker has said ``what``; a worker's error or death raises at once."""
        waiting = set(range(len(self.processes)))
        deadline = time.monotonic() + START_TIMEOUT
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TensorParallelError(f"ranks {sorted(i + 1 for i in waiting)} were not {what} after "
                                          f"{START_TIMEOUT:.0f} s")
            ready = wait_for_any([self.pipes[i] for i in waiting] + [self.processes[i].sentinel for i in waiting],
                                 timeout=left)
            for i in list(waiting):
                if self.pipes[i] in ready:
                    message = self.pipes[i].recv()
                    if message[0] == what:
                        waiting.discard(i)
                        continue
                    self.reports[i + 1] = f"rank {i + 1} raised:\n{message[1].rstrip()}"
                    raise TensorParallelError("see below")
                if self.processes[i].sentinel in ready:
                    raise TensorParallelError("see below")

    def _worker_errors(self, grace: float) -> list[str]:
        """What the workers report within ``grace`` seconds: their tracebacks, or how they ended."""
        deadline = time.monotonic() + grace
        reports = self.reports
        for rank, (process, pipe) in enumerate(zip(self.processes, self.pipes), start=1):
            while rank not in reports:
                left = deadline - time.monotonic()
                try:
                    if pipe.poll(max(left, 0)):
                        message = pipe.recv()
                        if message[0] == "error":
                            reports[rank] = f"rank {rank} raised:\n{message[1].rstrip()}"
                        continue
                except (EOFError, OSError):
                    pass
                process.join(timeout=max(left, 0))
                if process.exitcode is not None:
                    reports[rank] = f"rank {rank} exited with code {process.exitcode} without a report"
                break
        return [reports[r] for r in sorted(reports)]

    def fail(self, error: BaseException, when: str) -> TensorParallelError:
        """Stop the group after ``error``; the TensorParallelError to raise, naming the failed rank."""
        if self.failure is None:
            errors = self._worker_errors(grace=2.0)
            first = errors[0].splitlines()[-1] if errors else f"rank 0 raised {error!r}"
            hint = ""
            if when == "while starting" and any("exited with code" in e for e in errors):
                hint = (" (a worker that ends before it reports is often a script without an "
                        "`if __name__ == '__main__':` guard: the workers are started with spawn)")
            self.failure = (f"tensor parallelism failed {when}: {first}{hint}. The ranks are out of step, so this "
                            "LLM serves no more steps: create a new LLM (its workers have been stopped)."
                            + "".join(f"\n--- {e}" for e in errors))
            self._stop(graceful=False)
        return TensorParallelError(self.failure)

    def shutdown(self) -> None:
        """Stop the workers (idempotent). Later steps raise :class:`TensorParallelError`."""
        if self.failure is None:
            self.failure = "this LLM was shut down (llm.shutdown()); create a new LLM to generate again"
            self._stop(graceful=True)

    def _stop(self, graceful: bool) -> None:
        if graceful and self.collectives is not None and all(p.is_alive() for p in self.processes):
            try:
                self.collectives.send(STOP)
            except Exception:
                pass
        for process in self.processes:
            process.join(timeout=5.0 if graceful else 0.5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5.0)
            if process.is_alive():
                process.kill()
                process.join()
        for pipe in self.pipes:
            pipe.close()
        if self.collectives is not None:
            self.collectives.close()
