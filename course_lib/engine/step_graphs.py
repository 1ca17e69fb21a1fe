"""Whole-step CUDA graphs: every step — prefill, mixed, decode — replays one captured forward.

Why. A prefill step launches ~15 kernels per layer; on a slow host each launch costs tens of
microseconds, so a 12-layer step spends more time launching than computing. A CUDA graph records
the launches once and replays them all with one call.

How. A graph replays *fixed* kernels on *fixed* addresses with *fixed* shapes, so:

* the step's token count is rounded up to a **bucket** (1, 2, 4, ..., 512, then multiples of 512);
  one graph per bucket, captured for ``bucket`` token rows and ``min(bucket, max_num_seqs)``
  requests and logit rows;
* every array of the flat batch (batch.py) and of the attention kernel's tile table lives in a
  **static buffer** per bucket (one int64 tensor cut into named views); a step fills a pinned host
  image of it (a ring of them, used in turns: :class:`Staging`) and copies it over in one transfer
  that does not wait for the device, then replays;
* the attention kernel (triton_unified.py) has a static grid and reads which tile is whose from
  the buffer, so any mix of requests fits the same graph;
* a decode row whose token the host has not read yet (asynchronous scheduling, engine.py) takes its
  id inside the graph from the runner's ``sampled_tokens`` buffer, the row given by the static
  ``feed_rows`` buffer (0: the id in ``input_ids``);
* **padding**: token rows past the live ones have id 0, position 0 and write their K/V to slot 0,
  inside the null block (block_manager.NULL_BLOCK) that no request reads; they belong to no
  attention tile, so their attention output is never written (it holds whatever the memory held:
  every later kernel works row by row, and no tile loads the null block's keys); logit rows past
  the live ones point at row 0 and are dropped;
* **greedy tokens**: the graph ends with the argmax of its live logit rows (triton_argmax.py; their
  number is the static ``num_logits``), written into the runner's ``sampled_tokens`` — the buffer
  the next step's first kernel reads its device-fed ids from. A greedy step then needs nothing
  after the replay but the tokens' copy to the host.

All graphs are captured at start-up, largest bucket first, into one shared memory pool: each
smaller graph reuses the largest one's activation memory, all of them write their logits into
one shared ``(S, V)`` buffer, and no request ever waits for a capture in the middle of serving.
"""

from __future__ import annotations

import gc

import numpy as np
import torch

from .attention_tiles import max_tiles, tile_rows_for
from .batch import FlatBatch
from .triton_argmax import ArgmaxRows


def token_buckets(max_tokens: int) -> list[int]:
    """Graph sizes covering 1..max_tokens: powers of two to 512, then multiples of 512; the last
    one is the first size >= max_tokens."""
    sizes = []
    for b in [1, 2, 4, 8, 16, 32, 64, 128, 256] + list(range(512, max_tokens + 512, 512)):
        sizes.append(b)
        if b >= max_tokens:
            break
    return sizes


class StepBuffers:
    """The static buffers of one bucket: ``device`` (one int64 tensor) and named views into it."""

    def __init__(self, num_tokens: int, max_num_seqs: int, max_blocks: int, device):
        N, S, M = num_tokens, min(num_tokens, max_num_seqs), max_blocks
        self.num_tokens, self.num_seqs, self.max_blocks = N, S, M
        self.block_m = tile_rows_for(N)
        self.grid = max_tiles(N, S, self.block_m)
        self.shapes = {"input_ids": (N,), "positions": (N,), "slot_mapping": (N,), "feed_rows": (N,),
                       "logits_indices": (S,), "num_logits": (1,),
                       "context_lens": (S,), "query_start": (S + 1,), "block_tables": (S, M),
                       "tile_seq": (self.grid,), "tile_row": (self.grid,), "num_tiles": (1,)}
        sizes = [int(np.prod(s)) for s in self.shapes.values()]
        self.size = sum(sizes)
        self.device = torch.zeros(self.size, dtype=torch.long, device=device)
        self.offsets = dict(zip(self.shapes, np.cumsum([0] + sizes[:-1]).tolist()))
        self.views = {name: part.view(shape) for (name, shape), part
                      in zip(self.shapes.items(), self.device.split(sizes))}

    def fits(self, flat: FlatBatch) -> bool:
        return flat.num_tokens <= self.num_tokens and flat.num_seqs <= self.num_seqs

    def load(self, arrays: dict[str, np.ndarray], staging: "Staging") -> None:
        """Copy one step's arrays in (zeros past the live entries: padding → the null block), through
        a host image from ``staging``; the copy does not wait for the device."""
        i = staging.take()
        host = staging.images[i][:self.size]
        host.fill(0)
        for name, a in arrays.items():
            at, shape = self.offsets[name], self.shapes[name]
            if len(shape) == 2:        # a (B, width) block table into the (S, M) buffer
                host[at:at + shape[0] * shape[1]].reshape(shape)[:a.shape[0], :a.shape[1]] = a
            else:
                host[at:at + a.size] = a
        self.device.copy_(staging.tensors[i][:self.size], non_blocking=True)
        staging.copied(i)


class Staging:
    """A ring of host images the step buffers are filled through, used in turns; pinned on a GPU.

    A copy from pageable host memory may wait for the device to finish what is queued before it
    (the driver stages it through pinned memory of its own), and the host would then prepare the
    next step only once the device is idle. From pinned memory the copy is queued and the call
    returns at once; the image must then not be refilled before the device has read it. Each
    image's copy is marked by an event, and taking an image again waits for its last copy.

    So the ring's length is how many steps the host may run ahead of the device. A decode burst
    (engine.py) issues ``decode_burst`` steps at once, and with asynchronous scheduling the next
    burst is issued while the last one runs: ``2 * decode_burst + 2`` images let the host issue a
    whole burst without waiting for the device (the engine's choice, runner.py). With two, the host
    could run only two steps ahead: the work between two bursts then had to fit in two steps'
    device time (GPT-2 124M at batch 1 on an H200: ~0.43 ms), or the device waited for it."""

    def __init__(self, size: int, pinned: bool, images: int = 2):
        if isinstance(images, bool) or not isinstance(images, int) or images < 2:
            raise ValueError(f"Staging needs at least 2 images, got {images!r}")
        self.tensors = [torch.zeros(size, dtype=torch.long, pin_memory=pinned) for _ in range(images)]   # images x (size,)
        self.images = [t.numpy() for t in self.tensors]                                                   # their views
        self.events: list = [None] * images
        self.turn = 0

    def take(self) -> int:
        """The image to fill next, once the device has read what it held."""
        i, self.turn = self.turn, (self.turn + 1) % len(self.tensors)
        event = self.events[i]
        if event is not None and not event.query():
            event.synchronize()
        return i

    def copied(self, i: int) -> None:
        """Image ``i``'s copy to the device has been queued."""
        if self.tensors[i].is_pinned():
            self.events[i] = torch.cuda.Event()
            self.events[i].record()


class StepGraphs:
    """One captured forward per token bucket, replayed for any step that fits."""

    def __init__(self, runner, max_tokens: int, max_num_seqs: int, max_blocks: int, staging_images: int = 2):
        self.runner = runner
        self.buffers = {N: StepBuffers(N, max_num_seqs, max_blocks, runner.device)
                        for N in token_buckets(max_tokens)}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.argmax = ArgmaxRows(max(b.num_seqs for b in self.buffers.values()), runner.device)
        self.staging = Staging(max(b.size for b in self.buffers.values()), pinned=torch.device(runner.device).type == "cuda",
                               images=staging_images)

    def static_batch(self, buf: StepBuffers):
        """The DeviceBatch a bucket's graph is captured with: views of its buffers, full size."""
        from .runner import DeviceBatch

        v = buf.views
        meta = self.runner.attention.metadata(None, v, grid=buf.grid, block_m=buf.block_m)
        return DeviceBatch(v["input_ids"], v["positions"], v["slot_mapping"], v["logits_indices"], meta,
                           v["feed_rows"])

    def capture(self) -> None:
        """Capture every bucket, largest first, into one memory pool (the buffers start all-zero:
        no live tile, every row writes the null block — a harmless step to warm up on)."""
        # an engine dropped earlier may still own CUDA graphs in reference cycles; if the garbage
        # collector freed them in the middle of a capture, that capture would fail: collect now, and
        # not during the captures
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._capture_all()
        finally:
            if collecting:
                gc.enable()

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        weight = self.runner.model.lm_head.weight
        rows, V = max(buf.num_seqs for buf in self.buffers.values()), weight.shape[0]
        logits = torch.empty(rows, self.runner.logits_width, dtype=weight.dtype, device=weight.device)   # (S_max, width)
        for N in sorted(self.buffers, reverse=True):
            buf = self.buffers[N]
            batch = self.static_batch(buf)
            out = logits[:buf.num_seqs]                      # every graph writes the same logits buffer
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):                  # warm up: compile kernels, pick algorithms
                self.step(buf, batch, out)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.step(buf, batch, out)                   # (S, width)
            self.graphs[N] = (graph, out[:, :V])             # (S, V)
        torch.cuda.synchronize()

    def step(self, buf: StepBuffers, batch, logits_out: torch.Tensor) -> None:
        """What a bucket's graph records: the forward, its logits into ``logits_out`` (S, width), then
        the greedy token of each live logit row into the runner's ``sampled_tokens`` (S,)."""
        V = self.runner.config.vocab_size
        self.runner.forward(batch, logits_out=logits_out)
        self.argmax(logits_out[:, :V], buf.views["num_logits"], self.runner.sampled_tokens[:buf.num_seqs])

    def run(self, flat: FlatBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Replay the smallest bucket that holds the step: its logits ``(R, V)`` and greedy tokens
        ``(R,)`` (a view of the runner's ``sampled_tokens``), both overwritten by the next replay;
        ``None`` when no bucket holds it (then the runner runs it eagerly)."""
        for N, buf in self.buffers.items():
            if buf.fits(flat):
                R = len(flat.logits_indices)
                arrays = {**flat.arrays(), **self.runner.attention.extra_arrays(flat, block_m=buf.block_m),
                          "num_logits": np.array([R])}
                buf.load(arrays, self.staging)
                graph, logits = self.graphs[N]
                graph.replay()
                return logits[:R], self.runner.sampled_tokens[:R]
        return None
