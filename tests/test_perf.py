"""FLOP and byte counters against hand counts; the ceilings are measured, quickly, and positive."""

import pytest
import torch
from conftest import random_model

from course_lib import perf
from course_lib.config import GPTConfig
from course_lib.errors import InputError
from course_lib.model import GPT, Trace

CFG = GPTConfig(vocab_size=100, n_positions=64, n_embd=16, n_layer=2, n_head=4)


def test_gemm_and_gemv_counts():
    assert perf.gemm_flops(2, 3, 4) == 48                       # 6 outputs × 4 multiply-adds × 2
    assert perf.gemm_bytes(2, 3, 4, 4) == (8 + 12 + 6) * 4
    # GEMV (m = 1): about 2 FLOPs per 4-byte weight, so ~0.5 FLOP/byte in fp32; GEMM grows with m
    gemv = perf.arithmetic_intensity(perf.gemm_flops(1, 4096, 4096), perf.gemm_bytes(1, 4096, 4096))
    gemm = perf.arithmetic_intensity(perf.gemm_flops(4096, 4096, 4096), perf.gemm_bytes(4096, 4096, 4096))
    assert 0.49 < gemv < 0.5
    assert gemm == pytest.approx(2 * 4096 ** 3 / (3 * 4096 ** 2 * 4))


def test_parameter_count_matches_model():
    for cfg in (CFG, GPTConfig(), GPTConfig(n_embd=48, n_head=3, n_inner=100, n_layer=3)):
        m = GPT(cfg)
        assert perf.parameter_count(cfg) == m.num_params()
        assert perf.parameter_count(cfg, non_embedding=False) == m.num_params(non_embedding=False)


def test_step_cost_by_hand():
    D, L, V, F = 16, 2, 100, 64
    c = perf.step_cost(CFG, batch=3, new_tokens=5, past=7)
    assert c.flops["linear"] == 2 * (3 * D * D + D * D + 2 * D * F) * L * 3 * 5
    keys_seen = sum(7 + i + 1 for i in range(5))                  # query i sees past + i + 1 keys
    assert c.flops["attention"] == 4 * D * keys_seen * L * 3
    assert c.flops["lm_head"] == 2 * D * V * 3                    # last position of each sequence
    assert c.bytes["kv_read"] == 2 * L * 3 * 12 * D * 4
    assert c.bytes["kv_write"] == 2 * L * 3 * 5 * D * 4
    full = perf.step_cost(CFG, batch=3, new_tokens=5, past=7, causal=False)
    assert full.flops["attention"] == 4 * D * 5 * 12 * L * 3
    assert perf.step_cost(CFG, new_tokens=5, logits="all").flops["lm_head"] == 2 * D * V * 5


def test_prefill_attention_half_of_full_rectangle():
    T = 64
    causal = perf.attention_flops(CFG, 1, T, causal=True)
    full = perf.attention_flops(CFG, 1, T, causal=False)
    assert causal / full == pytest.approx((T + 1) / (2 * T))


def test_decode_cost_grows_with_context_and_batch_raises_intensity():
    d1, d2 = perf.decode_cost(CFG, 8), perf.decode_cost(CFG, 56)
    assert d2.total_flops > d1.total_flops and d2.total_bytes > d1.total_bytes
    assert d2.flops["linear"] == d1.flops["linear"]
    b1, b16 = perf.decode_cost(CFG, 32, batch=1), perf.decode_cost(CFG, 32, batch=16)
    assert b16.intensity > 3 * b1.intensity
    assert b16.bytes["weights"] == b1.bytes["weights"]           # weights read once for the batch
    assert b16.bytes["kv_read"] == 16 * b1.bytes["kv_read"]      # attention stays per sequence


def test_op_table_matches_step_cost():
    m = random_model(CFG)
    ids = torch.randint(0, 100, (2, 9))
    tr = Trace()
    m(ids, trace=tr)
    rows = perf.layer_op_table(tr, 1, m)
    assert [r.op for r in rows][:3] == ["ln_1", "qkv projection", "scores q @ kᵀ"]
    mm = {r.op: r.flops for r in rows if r.kind == "matmul"}
    weights = mm["qkv projection"] + mm["W_o projection"] + mm["fc (D→F)"] + mm["proj (F→D)"]
    bias_adds = 2 * 9 * (3 * 16 + 16 + 64 + 16)
    cost = perf.step_cost(CFG, batch=2, new_tokens=9, causal=False)
    assert weights - bias_adds == cost.flops["linear"] // 2      # one layer of two
    assert mm["scores q @ kᵀ"] + mm["weights @ v"] == cost.flops["attention"] // 2
    assert "FLOP/B" in perf.format_op_table(rows)
    with pytest.raises(InputError, match="trace"):
        perf.layer_op_table(Trace(), 0, m)


def test_ceilings_are_measured_and_positive():
    c = perf.measure_ceilings("cpu", matmul_n=256, copy_bytes=8 << 20, repeats=2)
    assert c.peak_flops > 1e8 and c.bandwidth > 1e8
    assert c.ridge == pytest.approx(c.peak_flops / c.bandwidth)
    assert c.attainable(1e-3) == pytest.approx(c.bandwidth * 1e-3)
    assert c.attainable(1e6) == c.peak_flops
    assert "GFLOP/s" in str(c)
    assert perf.time_matmul(1, 64, 64, repeats=2) > 0 and perf.time_matmul(8, 64, 64, repeats=1) > 0


def test_timing_the_model_is_quick_and_positive():
    m = GPT(CFG).eval()
    assert perf.time_prefill(m, 8, repeats=1) > 0
    assert perf.time_decode_step(m, 8, batch=2, repeats=1) > 0
    assert perf.time_decode_step(m, 8, repeats=1, use_cache=False) > 0
    cache = perf.random_cache(CFG, 2, 5)
    assert cache.seq_len == 5 and cache.keys[1].shape == (2, 4, 5, 4)


def test_device_names_and_figure_paths(monkeypatch):
    assert perf.device_slug("cpu").startswith("cpu-")
    assert " " not in perf.device_slug("cpu")
    monkeypatch.delenv("COURSE_SAVE_FIGURES", raising=False)
    assert perf.save_figure(None, "x") is None
    assert perf.figure_path("roofline").name.startswith("roofline_cpu-")
    monkeypatch.setenv("COURSE_TIMING_THREADS", "3")
    assert perf.timing_threads() == 3
    monkeypatch.setenv("COURSE_TIMING_THREADS", "zero")
    with pytest.raises(InputError):
        perf.timing_threads()


@pytest.mark.parametrize("call, message", [
    (lambda: perf.gemm_flops(0, 1, 1), "m must be a positive"),
    (lambda: perf.step_cost(CFG, new_tokens=60, past=10), "exceed n_positions"),
    (lambda: perf.step_cost(CFG, logits="some"), "logits must be"),
    (lambda: perf.step_cost(CFG, past=-1), "past must be"),
    (lambda: perf.time_fn(lambda: None, repeats=0), "repeats"),
    (lambda: perf.time_decode_step(GPT(CFG), 0), "context must be"),
])
def test_bad_input(call, message):
    with pytest.raises(InputError, match=message):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_seconds_times_the_graph_of_the_calls():
    x = torch.randn(2048, 2048, device="cuda")
    one = perf.captured_seconds([lambda: x @ x])
    four = perf.captured_seconds([lambda: x @ x] * 4)
    assert 0 < one < four < 8 * one


def test_time_decode_contexts_in_turns():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    times = perf.time_decode_contexts(model, [4, 48], batch=2, repeats=3)
    assert set(times) == {4, 48} and all(t > 0 for t in times.values())
    with pytest.raises(InputError, match="contexts"):
        perf.time_decode_contexts(model, [0, 8])
    with pytest.raises(InputError, match="repeats"):
        perf.time_decode_contexts(model, [8], repeats=0)
