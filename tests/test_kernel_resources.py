"""The engine's decode attention, compiled offline for an H100/H200 (sm_90, no GPU needed), keeps
its loads pipelined and its registers unspilled at the launch shapes the engine picks for decode
(benchmarks/kernel_resources.py): a change that made it spill, or that stopped Triton from
software-pipelining its key and value loads, would cost every decode step on a GPU and show here."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def kr():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted functions here, not compilable ones")
    import kernel_resources

    if not kernel_resources.PTXAS.exists():
        pytest.skip(f"this triton wheel has no ptxas at {kernel_resources.PTXAS}")
    return kernel_resources


def test_engine_decode_attention_is_pipelined_and_does_not_spill_on_sm90(kr):
    shapes = {label: (bm, bn, s, st) for label, bm, bn, s, st in kr.engine_attention_shapes()}
    assert shapes["decode B64, 124M"][2] == 1 and shapes["decode B1, XL"][2] > 1      # both paths covered
    for label in ("decode B1, XL", "decode B32, XL", "decode B64, 124M"):
        bm, bn, s, st = shapes[label]
        r = kr.unified_resources(bm, bn, s, num_stages=st)
        assert r["spill_bytes"] == 0, (label, r)
        assert r["cp_async"], (label, r)                          # the key/value loads go through cp.async
        assert r["registers"] <= 128 and r["programs_per_sm"] >= 4, (label, r)


def test_engine_prefill_attention_runs_on_hopper_warpgroup_mmas(kr):
    """Prefill tiles (64 rows) multiply with wgmma, Hopper's tensor-core instruction, not the older
    mma.sync that caps a kernel well below the H200's matmul ceiling, and fit without spills; with
    two stages their loads are pipelined (the few-prompt shape runs one stage: nothing to overlap)."""
    for label, bm, bn, s, st in kr.engine_attention_shapes():
        if label.startswith("prefill"):
            r = kr.unified_resources(bm, bn, s, num_stages=st)
            assert r["wgmma"] and r["spill_bytes"] == 0, (label, r)
            assert r["cp_async"] == (st > 1), (label, st, r)


def test_head_group_experiment_compiles_without_spills_on_sm90(kr):
    r = kr.head_group_resources(25, 2, num_warps=4)
    assert r["spill_bytes"] == 0 and r["programs_per_sm"] >= 4, r
