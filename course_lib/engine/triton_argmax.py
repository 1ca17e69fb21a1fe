"""Greedy sampling's argmax inside the step's CUDA graph: the token ids of the logit rows.

A greedy step's last work is ``logits.argmax(-1)`` over GPT-2's 50,257 logits a row. Run by torch
after the graph, it is one more launch outside the graph, and torch reduces a row of that length
with few programs: 12.0 us for one row of ~100 KB of bf16 logits on an NVIDIA H200, against 2.3
us for this kernel, and 12.6 against 5.0 us at 32 rows
(benchmarks/results/2026-12-03_nvidia-h200_probe_argmax.json). Here the graph ends with it.

How. Every row's logits are cut into chunks of ``BLOCK`` columns, one program a chunk, so one row
is read by ~25 programs at once. A program finds its chunk's largest logit and, among equal ones,
the first column; it packs both into one int64 whose order is the order we want — the logit in the
high 32 bits as an order-preserving integer (negative floats have their magnitude bits flipped;
NaN, as in ``torch.argmax``, counts as the largest; -0.0 counts as 0.0), ``2^31 - 1 - column`` in
the low 32 bits, so that of two equal logits the first column wins — and folds it into the row's
running maximum with one ``atomic_max``. The program that arrives last (an atomic counter per
row, as in the split-KV merge of triton_unified.py) reads the row's maximum, writes the token id
and sets the maximum and the counter back for the next launch. The result equals
``torch.argmax`` exactly (the same values compared, the same first-index rule).

Only the step's live rows are read: the graph is captured for all ``S`` logit rows of its bucket,
and the number of live ones comes from the step's buffers (rows past it exit at once).

Launched with programmatic dependent launch (pdl.py). Runs on CPU through the Triton interpreter
(tests/test_fused_kernels.py); the engine uses it only inside its CUDA graphs (step_graphs.py),
and ``torch.argmax`` everywhere else. Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InputError
from .pdl import pdl_enabled, pdl_launch_next, pdl_wait

#: columns a program reads: GPT-2's 50,257 logits are 25 programs a row
BLOCK = 2048
#: the running maximum's value between launches: below every packed (logit, column)
EMPTY = -(2 ** 63)


@triton.jit
def _argmax_rows_kernel(logits_ptr, num_rows_ptr, best_ptr, arrived_ptr, out_ptr, V, stride_l,
                        BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_launch_next(USE_PDL)
    row = tl.program_id(0)
    if row >= tl.load(num_rows_ptr):       # the step's buffers, copied in before the graph: no wait needed
        return
    pdl_wait(USE_PDL)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < V
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_l + cols, mask=ok, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("nan"), x)                  # every NaN the same positive one: above +inf
    x = tl.where(x == 0.0, 0.0, x)                         # -0.0 == 0.0, as torch compares them
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)               # order-preserving: a < b  <=>  key(a) < key(b)
    col = tl.argmax(key, axis=0, tie_break_left=True)      # the chunk's first largest (padding is -inf, last)
    top = tl.max(key, axis=0)
    packed = (top.to(tl.int64) << 32) | (0x7FFFFFFF - (tl.program_id(1) * BLOCK + col)).to(tl.int64)
    tl.atomic_max(best_ptr + row, packed, sem="relaxed")
    # the maximum is folded in before the count (barrier); the count releases it and, in the program
    # that arrives last, acquires every other program's
    tl.debug_barrier()
    if tl.atomic_add(arrived_ptr + row, 1, sem="acq_rel") == tl.num_programs(1) - 1:
        best = tl.atomic_xchg(best_ptr + row, -9223372036854775808, sem="acquire")   # read, and reset
        tl.store(out_ptr + row, 0x7FFFFFFF - (best & 0x7FFFFFFF))
        tl.store(arrived_ptr + row, 0)


class ArgmaxRows:
    """The argmax of up to ``max_rows`` logit rows, with the two scratch buffers it keeps between
    launches (a running maximum and an arrival counter a row; made once, outside any capture)."""

    def __init__(self, max_rows: int, device):
        self.max_rows = max_rows
        self.best = torch.full((max_rows,), EMPTY, dtype=torch.int64, device=device)      # (S,)
        self.arrived = torch.zeros(max_rows, dtype=torch.int32, device=device)             # (S,)

    def __call__(self, logits: torch.Tensor, num_rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out[r] = argmax(logits[r])`` for ``r < num_rows``; rows past it are left as they were.
        ``logits`` (S, V) with contiguous rows; ``num_rows`` (1,) int64 on the device; ``out`` (S,)
        int64. Returns ``out``."""
        S, V = logits.shape
        if logits.stride(1) != 1 or S > self.max_rows or out.shape != (S,) or out.dtype != torch.int64:
            raise InputError(f"argmax_rows needs logits (S, V) with contiguous rows, S <= {self.max_rows}, and an "
                             f"int64 out of shape (S,); got logits {tuple(logits.shape)} and out "
                             f"{out.dtype} {tuple(out.shape)}")
        if num_rows.shape != (1,) or num_rows.dtype != torch.int64:
            raise InputError(f"num_rows must be a (1,) int64 tensor, got {num_rows.dtype} {tuple(num_rows.shape)}")
        if S and V:
            on = pdl_enabled(logits.device)
            _argmax_rows_kernel[(S, triton.cdiv(V, BLOCK))](
                logits, num_rows, self.best, self.arrived, out, V, logits.stride(0),
                BLOCK=BLOCK, USE_PDL=on, launch_pdl=on)
        return out
