"""Checks of the exercises in notebooks/10_prefill_vs_decode_on_your_hardware.ipynb."""

from __future__ import annotations

from .. import perf
from .common import correct, require, require_number, unanswered


def check_gemv(x) -> None:
    """Exercise 1: arithmetic intensity of a bf16 GEMV (1, 4096) @ (4096, 4096)."""
    if unanswered(x):
        return
    require_number(x, "the intensity")
    want = perf.gemm_flops(1, 4096, 4096) / perf.gemm_bytes(1, 4096, 4096, 2)
    require(abs(x - 2 * want) > 1e-6, "twice too much: bf16 takes 2 bytes per number")
    require(abs(x - want) < 1e-6, "FLOPs (2 per multiply-add) over the bytes of the vector, the matrix "
                                   "and the output, 2 bytes each")
    correct()


def ffn_intensity(config, batch: int, bytes_per_element: int) -> float:
    """Intensity of a (batch, D) @ (D, 4D) product."""
    D = config.n_embd
    return perf.gemm_flops(batch, 4 * D, D) / perf.gemm_bytes(batch, 4 * D, D, bytes_per_element)


def check_b(b, config, ridge: float, bytes_per_element: int) -> None:
    """Exercise 2: the smallest batch whose FFN product reaches the ridge."""
    if unanswered(b):
        return
    require(isinstance(b, int) and b >= 1, "a batch is a whole number of sequences, at least 1")
    require(ffn_intensity(config, b, bytes_per_element) >= ridge, f"at batch {b} the product is still below the ridge")
    require(b == 1 or ffn_intensity(config, b - 1, bytes_per_element) < ridge,
            f"batch {b - 1} already reaches the ridge: look for the smallest batch")
    correct()


def check_floor(x, config, context: int, bytes_per_element: int, bandwidth: float) -> None:
    """Exercise 3: the fastest possible TPOT (s) at batch 1: the step's bytes over the bandwidth."""
    if unanswered(x):
        return
    require_number(x, "the time")
    want = perf.decode_cost(config, context, bytes_per_element=bytes_per_element).total_bytes / bandwidth
    require(abs(x - want * 1e3) > 1e-6 * want * 1e3, "that looks like milliseconds: answer in seconds")
    require(abs(x - want) < 1e-9 + 1e-6 * want, "divide the bytes the step must move (perf.decode_cost) by "
                                                 "the measured bandwidth")
    correct()
