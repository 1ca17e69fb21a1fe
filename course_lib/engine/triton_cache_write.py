"""Writing new keys and values into the paged pool as one Triton kernel (GPU fast path).

Each program copies one token's key row and value row (``H * Dh`` values each) to its slot.
The rows arrive as strided views of the fused QKV projection, so no copy is made first; torch's
generic ``index_copy_`` does the same job but runs several times slower on these shapes.
Runs on CPU through the Triton interpreter (tests/test_engine_triton.py).
Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_enabled, pdl_launch_next, pdl_wait


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, slots_ptr, k_pool_ptr, v_pool_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, ROW_P2: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_launch_next(USE_PDL)
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)          # the step's slot table: no kernel writes it
    pdl_wait(USE_PDL)
    cols = tl.arange(0, ROW_P2)
    ok = cols < ROW
    k = tl.load(k_ptr + token * stride_k + cols, mask=ok)
    v = tl.load(v_ptr + token * stride_v + cols, mask=ok)
    tl.store(k_pool_ptr + slot * ROW + cols, k, mask=ok)
    tl.store(v_pool_ptr + slot * ROW + cols, v, mask=ok)


def write_kv(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
    """``k``, ``v``: (N, H, Dh) with contiguous rows; pools: contiguous (blocks, block_size, H, Dh)."""
    N, H, Dh = k.shape
    row = H * Dh
    assert k.stride(2) == 1 and k.stride(1) == Dh and v.stride(2) == 1 and v.stride(1) == Dh
    assert k_pool.is_contiguous() and v_pool.is_contiguous()
    if N == 0:
        return
    pdl = pdl_enabled(k.device)
    _write_kv_kernel[(N,)](k, v, slot_mapping, k_pool, v_pool, k.stride(0), v.stride(0),
                           ROW=row, ROW_P2=triton.next_power_of_2(row), USE_PDL=pdl, launch_pdl=pdl)
