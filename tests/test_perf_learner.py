"""The additions to course_lib.perf and course_lib.viz.roofline used by notebooks 08 and 10."""

import pytest
import torch

from conftest import random_model
from course_lib import perf
from course_lib.config import GPTConfig
from course_lib.errors import InputError
from course_lib.model import KVCache
from course_lib.viz.roofline import measured_bound, roof_fractions

CFG = GPTConfig(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)
CEIL = perf.Ceilings(device="cpu", name="test", dtype="float32", peak_flops=100e9, bandwidth=10e9,
                     matmul_n=1, copy_bytes=1)


def test_preallocated_cache_gives_the_reference_caches_logits_and_rows():
    model = random_model(CFG)
    ids = torch.randint(0, 97, (2, 6))
    ref, pre = KVCache(), perf.PreallocatedKVCache(CFG, 2, 10)
    with torch.no_grad():
        a, b = model(ids, kv_cache=ref), model(ids, kv_cache=pre)
        for t in (3, 5):
            a = model.decode_step(torch.tensor([t, t + 1]), ref)
            b = model.decode_step(torch.tensor([t, t + 1]), pre)
            assert torch.allclose(a, b, atol=1e-6)
    assert pre.seq_len == ref.seq_len == 8
    for k1, k2 in zip(ref.keys, pre.keys):
        assert torch.equal(k1, k2)
    pre.truncate(6)
    assert pre.seq_len == 6 and pre.keys[0].shape[2] == 6
    with pytest.raises(InputError):
        pre.append(0, torch.zeros(2, 4, 5, 8), torch.zeros(2, 4, 5, 8))   # 6 + 5 > 10


def test_preallocated_timing_and_read_bandwidth_are_positive():
    model = random_model(CFG)
    assert perf.fill_preallocated_cache(CFG, 1, 7).seq_len == 7
    assert 0 < perf.time_decode_step_preallocated(model, 16, batch=2, repeats=2) < 5
    with pytest.raises(InputError):
        perf.time_decode_step_preallocated(model, 0)
    bw, times = perf.measure_read_bandwidth(nbytes=8 << 20, repeats=2)
    assert bw > 1e8 and len(times) == 2


def test_measured_bound_labels_from_the_measurement():
    assert roof_fractions(CEIL, 50e9, 1e9) == {"compute": 0.5, "memory": 0.1}
    assert measured_bound(CEIL, 50e9, 1e9) == "compute-bound"
    assert measured_bound(CEIL, 5e9, 8e9) == "memory-bound"
    assert measured_bound(CEIL, 1e9, 1e9) == "overhead-bound"          # 1 % and 10 %: neither roof
    with pytest.raises(InputError):
        measured_bound(CEIL, 1e9, 1e9, explained=0)
