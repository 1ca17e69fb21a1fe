"""Programmatic dependent launch (PDL): the next kernel starts while this one is finishing.

Inside a decode step's CUDA graph every kernel waits for the one before it, and on a GPU each
hand-over costs a few microseconds of launch and ramp-up in which the memory system idles: a
GPT-2 124M decode step is ~140 kernels of a few microseconds each, so the hand-overs are a large
share of the step. Hopper (compute capability 9.0) lets a kernel launched with the PDL attribute
start *before* the kernel ahead of it has finished, as soon as that one has called
``griddepcontrol.launch_dependents``; the early kernel then calls ``griddepcontrol.wait``, which
returns once the kernel ahead has completed and its writes are visible.

The rules every kernel of ours follows (triton_gemv.py, triton_fused.py, triton_cache_write.py,
triton_unified.py):

* call :func:`pdl_launch_next` first, so the kernel after it may start;
* read only what no kernel of the step writes (weights, biases, the step's tile tables) before
  :func:`pdl_wait`; read activations, and store anything at all, only after it. The wait is
  transitive: a kernel completes only after its own wait returned, so by then every earlier
  kernel has completed too;
* a kernel of torch or cuBLAS in between is launched without the attribute: it starts after the
  kernel ahead of it completes, and the kernel after it waits for it — correct, without overlap.

A GEMV gains the most: its weights do not depend on the kernel ahead, so it streams them while
that kernel finishes (benchmarks/probe_session3.py, on an NVIDIA H200: GPT-2 124M's 48 weight
products at one row in one graph took 0.263 ms without PDL, 0.186 ms with it, cuBLAS 0.241 ms). Off on older GPUs, on
CPU and under the Triton interpreter, where the two calls compile to nothing. Measured in
benchmarks/NOTES.md.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

#: set to False (or COURSE_PDL=0 in the environment) to launch every kernel without PDL
ENABLED = os.environ.get("COURSE_PDL", "1") != "0"


def pdl_enabled(device: torch.device | None = None) -> bool:
    """Whether our kernels on ``device`` are launched with PDL: CUDA of compute capability >= 9,
    compiled kernels (not the interpreter), and :data:`ENABLED`."""
    if not ENABLED or os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available():
        return False
    if device is not None and torch.device(device).type != "cuda":
        return False
    return _hopper_or_newer(torch.cuda.current_device() if device is None or torch.device(device).index is None
                            else torch.device(device).index)


@functools.cache
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@triton.jit
def pdl_launch_next(USE_PDL: tl.constexpr):
    """Let the next kernel of the stream start now (it waits in :func:`pdl_wait` for this one)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait until the kernel ahead has completed and its writes are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
