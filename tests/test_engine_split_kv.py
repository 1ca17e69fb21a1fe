"""Split-KV decode attention (flash-decoding) of the Triton path: the split count, the config
option, the split kernel (its chunks merged in the same launch) against a plain softmax, and the
engine's greedy output with the split on equal to it off.

The kernels run through the Triton interpreter in a fresh process (TRITON_INTERPRET=1 must be set
before they are defined); the host-side choice of the split count is checked directly. The GPU
side (timings, bf16 on real hardware, inside CUDA graphs) is benchmarks/bench_attention.py, and
tests/test_engine_gpu.py replays the merge many times with one counter buffer.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_interpreted

from course_lib.engine.attention_tiles import PROGRAMS_PER_SM, default_block_n, kv_splits_for, max_tiles
from course_lib.engine.config import DEFAULT_MAX_KV_SPLITS, EngineConfig
from course_lib.engine.step_graphs import StepBuffers, token_buckets
from course_lib.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------- host side, no Triton
def test_split_count_fills_the_gpu_at_batch_1_and_is_off_when_the_grid_is_full():
    sms = 132
    # GPT-2 XL, batch 1: 25 programs without the split; with it about PROGRAMS_PER_SM per SM
    s = kv_splits_for(1, 25, 16, sms, 32)
    assert s > 1 and 25 * s >= PROGRAMS_PER_SM * sms > 25 * (s - 1)
    assert kv_splits_for(1, 12, 16, sms, 32) == 32                     # 124M: capped by max_splits
    assert kv_splits_for(1, 12, 16, sms, 8) == 8
    assert kv_splits_for(4, 25, 16, sms, 32) == 6                      # 100 programs -> 6 chunks each
    assert kv_splits_for(32, 25, 16, sms, 32) == 1                     # 800 programs: already full
    assert kv_splits_for(1, 25, 64, sms, 32) == 1                      # prefill-sized steps: never split
    assert kv_splits_for(1, 25, 16, sms, 1) == 1                       # the switch off
    # fewer programs never get fewer splits: the count only falls as the grid grows
    counts = [kv_splits_for(g, 25, 16, sms, 32) for g in range(1, 40)]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 1
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ConfigError, match="positive integer"):
            kv_splits_for(bad, 25, 16, sms, 32)
        with pytest.raises(ConfigError, match="positive integer"):
            kv_splits_for(1, 25, 16, sms, bad)


def test_split_count_stops_where_no_chunk_could_hold_keys():
    """A chunk is at least one key trip, so with at most ``max_keys`` keys (the model's context) a
    tile never has more than ceil(max_keys / trip) chunks that hold keys: the count stops there, and
    every context up to max_keys is cut into the same live chunks as without the bound."""
    sms = 132
    assert kv_splits_for(1, 12, 16, sms, 32, max_keys=1024) == 8         # GPT-2 124M batch 1: 32 -> 8
    assert kv_splits_for(1, 25, 16, sms, 32, max_keys=1024) == 8         # XL: 22 -> 8
    assert kv_splits_for(1, 12, 16, sms, 32, max_keys=1024, head_bytes=256) == 16   # wide heads: 64-key trips
    assert kv_splits_for(8, 12, 16, sms, 32, max_keys=1024) == 6         # already under the bound
    assert kv_splits_for(1, 12, 16, sms, 32, max_keys=100) == 1          # one trip holds every key

    def live_chunks(key_end, splits, trip):
        """(keys per chunk, chunks with keys) as the kernel cuts them (triton_unified._split_chunk)."""
        if splits == 1:
            return key_end, 1
        chunk = -(-(-(-key_end // splits)) // trip) * trip
        return chunk, -(-key_end // chunk)

    for grid in (1, 2, 4, 8, 16):
        for max_keys in (1, 100, 128, 576, 1024, 2048):
            free = kv_splits_for(grid, 12, 16, sms, 32)
            bound = kv_splits_for(grid, 12, 16, sms, 32, max_keys=max_keys)
            assert 1 <= bound <= free
            trip = default_block_n(16, grid, free, 128, 256)
            for key_end in range(1, max_keys + 1):
                a = live_chunks(key_end, free, trip)
                b = live_chunks(key_end, bound, default_block_n(16, grid, bound, 128, 256))
                assert a == b or a[1] == b[1] == 1, (grid, max_keys, key_end, free, bound, a, b)


def test_split_count_is_fixed_per_graph_bucket():
    """Every bucket's grid and tile rows are static, so is its split count: small buckets split, big
    ones do not (the plain grid already has thousands of programs)."""
    per_bucket = {}
    for N in token_buckets(8192):
        buf = StepBuffers(N, max_num_seqs=256, max_blocks=4, device="cpu")
        assert buf.grid == max_tiles(N, buf.num_seqs, buf.block_m)
        per_bucket[N] = kv_splits_for(buf.grid, 25, buf.block_m, 132, DEFAULT_MAX_KV_SPLITS)
    assert per_bucket[1] > per_bucket[4] > per_bucket[16] >= 1
    assert all(per_bucket[N] == 1 for N in per_bucket if N >= 32)


def test_max_kv_splits_option():
    from course_lib.config import GPTConfig

    model = GPTConfig(vocab_size=50, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    assert EngineConfig(device="cpu").resolve(model).max_kv_splits == 1            # CPU: off
    assert EngineConfig(device="cpu", max_kv_splits=1).resolve(model).max_kv_splits == 1
    for bad in (0, -3, 2.0, True, "4"):
        with pytest.raises(ConfigError, match="max_kv_splits must be a positive integer"):
            EngineConfig(max_kv_splits=bad)
    with pytest.raises(ConfigError, match="use attention='triton'"):
        EngineConfig(device="cpu", attention="torch", max_kv_splits=4).resolve(model)
    from course_lib.engine.attention import TritonAttention, make_attention

    assert make_attention("triton", 5).max_kv_splits == 5 and make_attention("torch", 1).name == "torch"
    with pytest.raises(ConfigError, match="max_kv_splits must be a positive integer"):
        TritonAttention(0)


# ---------------------------------------------------------------------- the kernels, interpreted
KERNELS = r"""
import torch
import course_lib.engine.triton_unified as tu
from course_lib.engine.triton_unified import unified_attention, build_tiles, max_tiles
from course_lib.engine.attention import gather_keys
from course_lib.engine.kv_cache import PagedKVCache
from course_lib.config import GPTConfig


def reference(q, kv, tables, qstart, ctx):
    # scores, causal mask by absolute position, softmax, @ V: by hand over the gathered keys
    outs, D = [], q.shape[-1]
    for i, (a, b) in enumerate(zip(qstart, qstart[1:])):
        keys, values = (t.float() for t in gather_keys(kv, 0, tables[i].long(), ctx[i]))
        scores = torch.einsum("nhd,shd->hns", q[a:b].float(), keys) / D ** 0.5
        pos = torch.arange(ctx[i] - (b - a), ctx[i])[:, None]
        w = scores.masked_fill(torch.arange(ctx[i])[None, :] > pos, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hns,shd->nhd", w, values))
    return torch.cat(outs)


COUNTERS = torch.zeros(512, dtype=torch.int32)              # one buffer for every split launch, as the engine


def case(mix, H, D, bs, dtype, block_m, splits, block_n, pad=3, counters=COUNTERS):
    cfg = GPTConfig(vocab_size=50, n_positions=256, n_embd=H * D, n_layer=1, n_head=H)
    need = [-(-c // bs) for _, c in mix]
    num_blocks = sum(need) + 3
    kv = PagedKVCache(cfg, num_blocks=num_blocks, block_size=bs, dtype=dtype)
    kv.pool.normal_()
    kv.pool[:, :, 0] = float("nan")                          # the null block: never read
    perm = torch.randperm(num_blocks)[:sum(need)] + 1         # scattered blocks
    tables = torch.zeros(len(mix), max(need) + 1, dtype=torch.int32)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[at:at + n].to(torch.int32)
        at += n
    qstart = [0]
    for n, _ in mix:
        qstart.append(qstart[-1] + n)
    ctx = [c for _, c in mix]
    N = qstart[-1]
    q = torch.randn(N + pad, H, D, dtype=dtype)               # padded rows past the live ones
    seqs, rows = build_tiles(qstart, ctx, block_m)
    grid = max_tiles(N + pad, len(mix), block_m) + 1          # more programs than tiles
    as_t = lambda xs: torch.tensor(xs + [0] * (grid - len(xs)), dtype=torch.long)
    args = (q, kv.k[0], kv.v[0], tables, torch.tensor(ctx, dtype=torch.int32), torch.tensor(qstart, dtype=torch.int32),
            as_t(seqs), as_t(rows), torch.tensor([len(seqs)]), grid, block_m)
    out = torch.full_like(q, float("nan"))                    # poison: every live row must be written
    unified_attention(*args, out=out, block_n=block_n, num_splits=splits, split_counters=counters)
    assert not COUNTERS.any(), "every launch leaves its arrival counters at 0"
    assert not out[:N].isnan().any(), "a live row was not written"
    assert out[N:].isnan().all(), "padded rows belong to no tile and stay untouched"
    err = (out[:N].float() - reference(q, kv, tables, qstart, ctx)).abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    print(f"case {mix} H={H} D={D} bs={bs} {str(dtype)[6:]} block_m={block_m} S={splits} block_n={block_n}: "
          f"max err {err:.1e}", "ok" if err < tol else "FAIL")
    assert err < tol, err
    return out[:N]


torch.manual_seed(0)
f32, bf16 = torch.float32, torch.bfloat16
# (query rows, keys) per sequence. Batches of 1..5 decodes with contexts that are not multiples of
# the block size (bs) or of the chunk, one shorter than a chunk (3 keys), a single key;
# mixed steps: a fresh prefill, a prefill of a prompt with a cached prefix, a chunk in the middle
for mix, H, D, bs, dtype, splits, block_n in [
    ([(1, 45)], 2, 32, 4, f32, 1, 16),                        # S=1: the plain kernel
    ([(1, 45)], 2, 32, 4, f32, 3, 16),                        # 45 keys in chunks of 16, 16, 13
    ([(1, 45)], 2, 32, 4, bf16, 7, 16),                       # more splits than chunks hold keys
    ([(1, 3), (1, 70)], 3, 16, 8, f32, 4, 16),                # 3 keys: shorter than one chunk
    ([(1, 1), (1, 33), (1, 64)], 2, 64, 16, bf16, 2, 32),
    ([(1, 9), (1, 100), (1, 17), (1, 50)], 1, 32, 7, f32, 5, 16),
    ([(1, 130), (1, 2), (1, 61), (1, 16), (1, 90)], 2, 32, 16, bf16, 8, 16),   # batch 5
    ([(1, 40), (1, 7), (23, 23), (17, 70), (40, 95)], 2, 32, 4, f32, 4, 16),  # mixed, prefix, chunk
    ([(1, 40), (1, 7), (23, 23), (17, 70), (40, 95)], 2, 32, 4, bf16, 3, 16),
]:
    case(mix, H, D, bs, dtype, 16, splits, block_n)
case([(1, 9), (5, 5), (40, 95)], 2, 32, 4, f32, 64, 3, 16)     # 64-row tiles split the same way
case([(1, 45), (1, 120)], 2, 32, 4, f32, 16, 4, None)          # the default trip: 128 keys (a few decodes)
case([(1, 300)], 2, 64, 16, bf16, 16, 4, None)                  # 300 keys: chunks of 128, 128, 44, one empty
case([(1, 45), (1, 9)], 2, 32, 4, f32, 16, 3, 16, counters=None)  # no buffer given: a zeroed one of its own
for bad in (torch.zeros(512, dtype=torch.int64), torch.zeros(3, dtype=torch.int32)):
    try:
        case([(1, 45)], 2, 32, 4, f32, 16, 3, 16, counters=bad)
    except ValueError as e:
        assert "split_counters must be a contiguous int32 tensor" in str(e), e
    else:
        raise AssertionError("a wrong counter buffer was accepted")
# the default trip: 128 keys for a few decodes (split or not) and for one or two long prompts; 64 for
# many decodes, bigger prefill steps, and heads wider than 128 bytes
assert [tu.default_block_n(16, g, s, 128, 256) for g, s in ((1, 22), (8, 3), (9, 2), (1, 1), (32, 1))] == \
    [128, 128, 64, 128, 64]
# one or two long prompts: 64-row tiles with 128-key trips in one stage; bigger steps 64 keys in two
assert tu.default_block_n(64, 268, 1, 128, 1024) == 128 and tu.default_block_n(64, 284, 1, 128, 2048) == 128
assert tu.default_block_n(64, 380, 1, 128, 8192) == 64 and tu.default_block_n(64, 268, 1, 256, 1024) == 64
assert tu.default_num_stages(64, 128) == 1 and tu.default_num_stages(64, 64) == 2 and tu.default_num_stages(16, 128) == 2
assert tu.default_block_n(16, 1, 22, 256, 1) == 64 and tu.default_block_n(16, 1, 1, 256, 1) == 64

# the split path and the plain kernel agree with each other, not only with the reference
torch.manual_seed(1)
a = case([(1, 77), (1, 20)], 2, 32, 4, f32, 16, 1, 16)
torch.manual_seed(1)
b = case([(1, 77), (1, 20)], 2, 32, 4, f32, 16, 6, 16)
assert (a - b).abs().max().item() < 1e-5

print("kernels ok")
"""

ENGINE = r"""
import torch
import course_lib.engine.triton_unified as tu
from course_lib.engine import LLM, SamplingParams
from course_lib.tiny import load_tiny

import course_lib.engine.attention_tiles as at
at.SPLIT_BLOCK_N = at.SPLIT_BLOCK_N_FEW = 16   # short trips: the tiny model's 20..80 keys span several chunks
used = []
plain = tu.unified_attention
def counting(*a, num_splits=1, **k):
    used.append(num_splits)
    return plain(*a, num_splits=num_splits, **k)
tu.unified_attention = counting

model, tok = load_tiny()                      # trained: its next tokens depend on attention
base = tok.encode("The for statement is used to iterate over the elements of a sequence, in order")
prompts = [tok.encode("def "), base + tok.encode(" of a"), base[:13], base * 3]   # shared prefixes
p = SamplingParams(max_tokens=6, ignore_eos=True)
opts = dict(device="cpu", block_size=4, max_num_batched_tokens=32)
want = [o.token_ids for o in LLM(model, attention="torch", **opts).generate(prompts, p)]
off = LLM(model, attention="triton", max_kv_splits=1, **opts)
assert [o.token_ids for o in off.generate(prompts, p)] == want
assert set(used) == {1}, used
used.clear()
on = LLM(model, attention="triton", max_kv_splits=4, **opts)
assert on.engine.runner.attention.max_kv_splits == 4
assert on.engine.runner.attention.max_keys == model.config.n_positions   # the bound on the chunks: the context
assert on.engine.runner.attention.head_bytes == model.config.head_dim * 4  # fp32 keys
got = [o.token_ids for o in on.generate(prompts, p)]
assert got == want, (got, want)
assert 4 in used, used                         # small steps (the decodes) were split
eng = on.engine
assert eng.block_manager.num_hit_tokens > 0                                            # prefix hits
assert any(r.num_prefill_tokens and r.num_decode_tokens for r in eng.ledger.records)   # mixed steps
print("engine split == off == torch", sorted(set(used)))
"""



def test_split_kv_kernels_match_reference_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted(KERNELS, "kernels ok")


def test_engine_greedy_output_same_with_split_kv_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted(ENGINE, "engine split == off == torch")


def test_bench_attention_correctness_part_runs_on_cpu(tmp_path):
    """The GPU script's CPU side: its correctness shapes through the interpreter, its JSON written."""
    pytest.importorskip("triton")
    import json

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "benchmarks/bench_attention.py", "--smoke", "--skip", "kernel,engine,sweep",
                        "--out", str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL  " not in r.stdout and r.stdout.count("PASS  ") == 8 and "8 PASS, 0 FAIL" in r.stdout, r.stdout
    (result,) = tmp_path.glob("bench_attention_*.json")
    data = json.loads(result.read_text())
    assert data["meta"]["triton"] and all(c["pass"] for c in data["correctness"])
    assert {c["num_splits"] for c in data["correctness"]} == {1, 3}
