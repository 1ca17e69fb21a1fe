"""The head-group decode attention experiment (benchmarks/attention_head_groups.py) against a plain
softmax, through the Triton interpreter in a fresh process: ragged contexts, chunks that split a
context or hold all of it, head counts that are not powers of two, groups of one to all heads (the
last group cut short), one counter buffer reused by several launches. Its GPU timing beside the
engine's kernel is bench_attention.py's ``head_groups`` part."""

import pytest
from conftest import run_interpreted

KERNEL = r'''
import sys
sys.path.insert(0, "benchmarks")
import torch
import bench_attention as ba
from attention_head_groups import head_group_decode

torch.manual_seed(0)
cases = [(3, [1, 17, 40, 5], 16, 16, None), (12, [33, 2, 64], 32, 16, 4), (5, [100, 7], 48, 32, 2),
         (25, [16, 16], 16, 16, 8), (25, [70, 3], 32, 16, None), (12, [50], 16, 16, 1)]
counters = torch.zeros(64, dtype=torch.int32)
for H, ctxs, chunk, bn, hg in cases:
    step = ba.Step([(1, c) for c in ctxs], H, 16, torch.float32, torch.device("cpu"), seed=len(ctxs), layers=2)
    for layer in range(2):                                 # the same counters for every launch
        out = head_group_decode(step.q, step.pool[layer, 0], step.pool[layer, 1], step.tables, step.context_lens,
                                max(ctxs), heads_per_program=hg, chunk_keys=chunk, block_n=bn, counters=counters)
        err = (out - step.reference(layer)).abs().max().item()
        assert err < 1e-4, (H, ctxs, chunk, bn, hg, layer, err)
        assert not out.isnan().any() and counters.abs().sum() == 0, counters
for bad, kw in (("contiguous", {}), ("power of two", {"heads_per_program": 3})):
    try:
        head_group_decode(step.q if kw else step.q.transpose(1, 2).contiguous().transpose(1, 2), step.pool[0, 0],
                          step.pool[0, 1], step.tables, step.context_lens, 16, **kw)
    except ValueError as e:
        assert bad in str(e), e
    else:
        raise AssertionError(f"accepted: {bad}")
print("head groups ok")
'''


def test_head_group_decode_matches_a_plain_softmax_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted(KERNEL, "head groups ok")
