"""The all-heads decode attention experiment (benchmarks/attention_all_heads.py) against a plain
softmax, through the Triton interpreter in a fresh process: ragged contexts, chunks that split a
context or hold all of it, head counts that are not powers of two, one counter buffer reused by
several launches. Its GPU timing beside the engine's kernel is bench_attention.py's ``all_heads``."""

import pytest
from conftest import run_interpreted

KERNEL = r'''
import sys
sys.path.insert(0, "benchmarks")
import torch
import bench_attention as ba
from attention_all_heads import all_heads_decode

torch.manual_seed(0)
cases = [(3, [1, 17, 40, 5], 16, 16), (12, [33, 2, 64], 32, 16), (5, [100, 7], 48, 32), (25, [16, 16], 16, 16)]
counters = torch.zeros(8, dtype=torch.int32)
for H, ctxs, chunk, bn in cases:
    step = ba.Step([(1, c) for c in ctxs], H, 16, torch.float32, torch.device("cpu"), seed=len(ctxs), layers=2)
    for layer in range(2):                                 # the same counters for every launch
        out = all_heads_decode(step.q, step.pool[layer, 0], step.pool[layer, 1], step.tables, step.context_lens,
                               max(ctxs), chunk_keys=chunk, block_n=bn, counters=counters)
        err = (out - step.reference(layer)).abs().max().item()
        assert err < 1e-4, (H, ctxs, chunk, bn, layer, err)
        assert not out.isnan().any() and counters.abs().sum() == 0, counters
try:
    all_heads_decode(step.q.transpose(0, 1).contiguous().transpose(0, 1), step.pool[0, 0], step.pool[0, 1],
                     step.tables, step.context_lens, 16)
except ValueError as e:
    assert "contiguous" in str(e)
else:
    raise AssertionError("a query tensor with strided heads was accepted")
print("all heads ok")
'''


def test_all_heads_decode_matches_a_plain_softmax_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted(KERNEL, "all heads ok")
