"""course_lib.parallel: sharding, the tensor-parallel forward, pipeline schedules, and real
worker processes over torch.distributed (gloo) that always end, on an error too."""

import multiprocessing
import time

import pytest
import torch
import torch.distributed as dist

from conftest import RANDOM_CONFIGS, random_model
from course_lib import parallel as P
from course_lib.config import GPTConfig
from course_lib.errors import ConfigError, InputError
from course_lib.model import KVCache

SMALL = GPTConfig(vocab_size=97, n_positions=64, n_embd=64, n_layer=4, n_head=4)


# --------------------------------------------------------------------------- sharding, one process


@pytest.mark.parametrize("cfg_index", range(len(RANDOM_CONFIGS)))
def test_tp_in_one_process_equals_model(cfg_index):
    cfg = GPTConfig(**RANDOM_CONFIGS[cfg_index])
    model = random_model(cfg, seed=cfg_index)
    ids = torch.randint(0, cfg.vocab_size, (2, min(9, cfg.n_positions)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
    sizes = [n for n in (1, 2, 3, 4, 8) if cfg.n_head % n == 0 and cfg.mlp_dim % n == 0]
    assert sizes
    for n in sizes:
        got = P.tp_forward_in_one_process(model, ids, n)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (cfg_index, n)


def test_shards_hold_the_right_columns_and_rows():
    model = random_model(SMALL)
    blk = model.transformer.h[1]
    D, F = SMALL.n_embd, SMALL.mlp_dim
    s1 = P.shard_block(blk, 1, 2)
    assert s1.layer_idx == 1 and s1.n_heads == 2
    W = blk.attn.c_attn.weight.detach()
    assert torch.equal(s1.qkv_w, torch.cat([W[:, D // 2:D], W[:, D + D // 2:2 * D], W[:, 2 * D + D // 2:]], 1))
    assert torch.equal(s1.o_w, blk.attn.c_proj.weight.detach()[D // 2:])
    assert torch.equal(s1.fc_w, blk.mlp.c_fc.weight.detach()[:, F // 2:])
    assert torch.equal(s1.proj_w, blk.mlp.c_proj.weight.detach()[F // 2:])
    full = P.shard_model(model, 0, 1).nbytes()
    assert P.shard_model(model, 0, 2).nbytes() * 2 == full == P.shard_model(model, 1, 4).nbytes() * 4


def test_partials_sum_to_the_block():
    model = random_model(SMALL)
    blk = model.transformer.h[0]
    x = torch.randn(2, 5, SMALL.n_embd)
    with torch.no_grad():
        shards = [P.shard_block(blk, r, 4) for r in range(4)]
        attn = sum(P.attention_partial(s, blk.ln_1(x)) for s in shards) + shards[0].o_b
        assert torch.allclose(attn, blk.attn(blk.ln_1(x)), atol=1e-6)
        mlp = sum(P.mlp_partial(s, blk.ln_2(x)) for s in shards) + shards[0].proj_b
        assert torch.allclose(mlp, blk.mlp(blk.ln_2(x)), atol=1e-6)
        assert not torch.allclose(P.attention_partial(shards[0], blk.ln_1(x)) + shards[0].o_b,
                                  blk.attn(blk.ln_1(x)), atol=1e-4)


def test_tp_forward_counts_two_allreduces_per_layer_and_their_bytes():
    model = random_model(SMALL)
    shard = P.shard_model(model, 0, 1)
    ids = torch.randint(0, SMALL.vocab_size, (3, 7))
    timer = P.CommTimer()
    calls = []
    logits = P.tp_forward(shard, ids, all_reduce=lambda t: calls.append(tuple(t.shape)), timer=timer)
    assert calls == [(3, 7, SMALL.n_embd)] * (2 * SMALL.n_layer)
    assert timer.allreduce_bytes == [3 * 7 * SMALL.n_embd * 4] * (2 * SMALL.n_layer)
    kinds = [k for k, _, _ in timer.intervals]
    assert kinds.count("all_reduce") == 2 * SMALL.n_layer and kinds[-1] == "compute"
    assert timer.total("compute") > 0
    with torch.no_grad():
        assert torch.allclose(logits, model(ids), atol=1e-5)     # one rank: the all-reduce is the identity


def test_tp_forward_with_a_sharded_cache_equals_decode():
    model = random_model(SMALL)
    shard = P.shard_model(model, 0, 1)
    ids = torch.randint(0, SMALL.vocab_size, (1, 6))
    cache = KVCache()
    got = P.tp_forward(shard, ids, all_reduce=lambda t: None, kv_cache=cache, last_only=True)
    got = P.tp_forward(shard, got.argmax(-1)[:, None], all_reduce=lambda t: None, kv_cache=cache, last_only=True)
    want_logits, want_cache = model.prefill(ids)
    want = model.decode_step(want_logits.argmax(-1), want_cache)
    assert torch.allclose(got, want, atol=1e-5)
    assert cache.seq_len == 7


def test_bad_sizes_get_clear_errors():
    model = random_model(SMALL)
    with pytest.raises(ConfigError, match="heads"):
        P.check_tp_size(SMALL, 3)
    with pytest.raises(ConfigError, match="MLP"):
        P.check_tp_size(GPTConfig(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2, n_inner=9), 2)
    with pytest.raises(ConfigError):
        P.check_tp_size(SMALL, 0)
    with pytest.raises(InputError, match="rank"):
        P.shard_block(model.transformer.h[0], 2, 2)
    with pytest.raises(InputError):
        P.ModelSpec.random({"n_embd": 8})
    with pytest.raises(InputError):
        P.ModelSpec("nope").gpt_config()


# --------------------------------------------------------------------------- schedules


def test_stage_layers():
    assert P.stage_layers(8, 2) == [range(0, 4), range(4, 8)]
    assert P.stage_layers(5, 3) == [range(0, 2), range(2, 3), range(3, 5)]
    assert [i for r in P.stage_layers(7, 7) for i in r] == list(range(7))
    with pytest.raises(InputError, match="layers"):
        P.stage_layers(2, 3)
    with pytest.raises(InputError):
        P.stage_layers(4, 0)


def test_ideal_schedule_bubble_matches_the_formula():
    for p in range(1, 6):
        for m in range(1, 10):
            rows = P.ideal_schedule(p, m)
            assert len(rows) == p * m
            assert max(r[3] for r in rows) == m + p - 1
            assert abs(P.bubble_fraction(rows, p) - P.ideal_bubble(p, m)) < 1e-12
    assert P.ideal_bubble(2, 1) == 0.5
    with pytest.raises(InputError):
        P.ideal_bubble(0, 3)


def test_bubble_fraction_and_overlap_from_hand_made_intervals():
    rows = [(0, 0, 0.0, 2.0), (0, 1, 1.0, 3.0),      # overlapping intervals of one stage count once
            (1, 0, 3.0, 4.0)]
    # makespan 4; stage 0 busy 3, stage 1 busy 1: idle (8 - 4) / 8
    assert P.bubble_fraction(rows, 2) == pytest.approx(0.5)
    assert P.overlap_seconds(rows, 0, 1) == 0.0
    assert P.overlap_seconds([(0, 0, 0.0, 2.0), (1, 0, 1.5, 3.0)], 0, 1) == pytest.approx(0.5)
    with pytest.raises(InputError):
        P.bubble_fraction([], 2)
    with pytest.raises(InputError):
        P.bubble_fraction([(0, 0, 1.0, 1.0)], 1)


def test_stage_cache_numbers_its_own_layers():
    model = random_model(SMALL)
    ids = torch.randint(0, SMALL.vocab_size, (1, 5))
    _, full = model.prefill(ids)
    x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(5))
    caches = [P.StageCache(first_layer=r.start) for r in P.stage_layers(4, 2)]
    with torch.no_grad():
        for cache, layers in zip(caches, P.stage_layers(4, 2)):
            for i in layers:
                x = model.transformer.h[i](x, cache)
    assert [c.seq_len for c in caches] == [5, 5]
    assert all(torch.allclose(a, b) for a, b in zip(caches[0].keys + caches[1].keys, full.keys))


# --------------------------------------------------------------------------- real processes


def _raise_on_rank_1(rank, world_size):
    if rank == 1:
        raise RuntimeError("boom on rank 1")
    x = torch.empty(1)
    dist.recv(x, src=1)                   # rank 0 blocks forever: the parent must end it
    return rank


def _sleep(rank, world_size, seconds):
    time.sleep(seconds)
    return rank


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t, "world": dist.get_world_size()}


def _no_children_left():
    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not multiprocessing.active_children()


def test_run_ranks_all_reduce_and_results_come_back_as_numpy():
    out = P.run_ranks(_sum_ranks, 2)
    assert [o["rank"] for o in out] == [0, 1]
    assert all(float(o["sum"][0]) == 3.0 and o["world"] == 2 for o in out)
    assert _no_children_left()


def test_a_failing_rank_raises_and_every_process_ends():
    with pytest.raises(P.WorkerError, match="boom on rank 1"):
        P.run_ranks(_raise_on_rank_1, 2, timeout_s=60)
    assert _no_children_left()


def test_a_run_past_its_timeout_is_stopped():
    t0 = time.monotonic()
    with pytest.raises(P.WorkerError, match="did not finish"):
        P.run_ranks(_sleep, 2, (30,), timeout_s=1.0)
    assert time.monotonic() - t0 < 15
    assert _no_children_left()


def test_run_ranks_bad_input():
    with pytest.raises(InputError, match="top level"):
        P.run_ranks(lambda rank, world: rank, 2)
    with pytest.raises(InputError):
        P.run_ranks(_sum_ranks, 0)
    with pytest.raises(InputError):
        P.run_ranks(_sum_ranks, 9)


def test_run_tensor_parallel_tiny_matches_one_process():
    from course_lib.tiny import load_tiny

    model, tok = load_tiny()
    ids = torch.tensor([tok.encode("A list is a mutable sequence.")])
    T = ids.shape[1]
    out = P.run_tensor_parallel(P.ModelSpec.tiny(), ids, n_new=5, timing_lengths=(8,), repeats=1,
                                allreduce_sizes=(4096,))
    with torch.no_grad():
        want = model(ids)
    want_tokens = model.generate(ids, 5)[:, T:]
    for rank, r in enumerate(out):
        assert torch.allclose(torch.from_numpy(r["logits"]), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.from_numpy(r["tokens"]), want_tokens)
        assert r["n_allreduce"] == 2 * model.config.n_layer
        assert r["cache_shape"] == (1, model.config.n_head // 2, T + 4, model.config.head_dim)
        assert r["shard_bytes"] * 2 == r["block_bytes"]
        row = r["timing"][0]
        assert row["bytes_per_allreduce"] == 8 * model.config.n_embd * 4
        assert row["compute"] > 0 and row["transfer"] > 0 and row["waiting"] >= 0
        assert {b["bytes"] for b in r["allreduce_bench"]} == {4096, row["bytes_per_allreduce"]}
    assert _no_children_left()


def test_run_tensor_parallel_bad_input():
    with pytest.raises(ConfigError):
        P.run_tensor_parallel(P.ModelSpec.tiny(), [[1, 2]], world_size=3)
    with pytest.raises(InputError):
        P.run_tensor_parallel(P.ModelSpec.tiny(), [[1, 5000]])
    with pytest.raises(InputError, match="context"):
        P.run_tensor_parallel(P.ModelSpec.tiny(), [[1, 2]], n_new=500)


def test_run_pipeline_matches_one_process_and_its_schedule_is_causal():
    spec = P.ModelSpec.random(SMALL, seed=3)
    model = spec.build()
    batch = torch.randint(0, SMALL.vocab_size, (4, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(batch)[:, -1]
    runs = P.run_pipeline(spec, batch, micro_counts=(1, 4), repeats=2)
    assert [r["n_micro"] for r in runs] == [1, 4]
    for run in runs:
        m = run["n_micro"]
        assert torch.allclose(torch.from_numpy(run["logits"]), want, atol=1e-5)
        assert sorted((r[0], r[1]) for r in run["intervals"]) == [(s, j) for s in range(2) for j in range(m)]
        assert len(run["makespans"]) == 2
        for j in range(m):
            s0 = next(r for r in run["intervals"] if r[:2] == (0, j))
            s1 = next(r for r in run["intervals"] if r[:2] == (1, j))
            assert s1[2] >= s0[3] - 1e-4                  # one clock: stage 1 starts after stage 0 sent
        assert 0 <= P.bubble_fraction(run["intervals"], 2) < 1
    assert _no_children_left()
    with pytest.raises(InputError, match="micro-batch"):
        P.run_pipeline(spec, batch, micro_counts=(5,))
    with pytest.raises(InputError, match="layers"):
        P.run_pipeline(spec, batch, world_size=5)


def test_run_chunk_pipeline_equals_unsplit_prefill():
    spec = P.ModelSpec.random(SMALL, seed=4)
    model = spec.build()
    ids = torch.randint(0, SMALL.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    want_logits, want_cache = model.prefill(ids)
    out = P.run_chunk_pipeline(spec, ids, n_chunks=3, repeats=1)
    assert out["bounds"] == [0, 10, 20, 30]
    assert torch.allclose(torch.from_numpy(out["logits"]), want_logits, atol=1e-5)
    assert len(out["keys"]) == SMALL.n_layer
    for layer in range(SMALL.n_layer):
        assert torch.allclose(torch.from_numpy(out["keys"][layer]), want_cache.keys[layer], atol=1e-5)
        assert torch.allclose(torch.from_numpy(out["values"][layer]), want_cache.values[layer], atol=1e-5)
    assert sorted((r[0], r[1]) for r in out["intervals"]) == [(s, c) for s in range(2) for c in range(3)]
    assert _no_children_left()
    with pytest.raises(InputError, match="one prompt"):
        P.run_chunk_pipeline(spec, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(InputError, match="n_chunks"):
        P.run_chunk_pipeline(spec, ids, n_chunks=31)
