"""The engine's Triton path on CPU: the unified attention kernel, the K/V write kernel and the
whole-step graph bookkeeping.

The kernels run through the Triton interpreter (TRITON_INTERPRET=1 must be set before they are
defined, so those checks run in a fresh process); the host-side tile table and buckets are
checked directly. The GPU side (real graphs, bf16, transformers) is tests/test_engine_gpu.py.
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from course_lib.engine.attention_tiles import build_tiles, max_tiles, tile_rows_for
from course_lib.engine.step_graphs import Staging, StepBuffers, token_buckets
from course_lib.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------- host side, no Triton
def test_tiles_cover_every_row_once_and_never_span_two_sequences():
    rng = random.Random(0)
    for _ in range(200):
        B = rng.randint(1, 12)
        qlens = [rng.choice([1, 1, rng.randint(1, 200)]) for _ in range(B)]
        ctx = [q + rng.choice([0, rng.randint(0, 300)]) for q in qlens]
        qstart = [0]
        for q in qlens:
            qstart.append(qstart[-1] + q)
        N = qstart[-1]
        for block_m in (16, 64):
            seqs, rows = build_tiles(qstart, ctx, block_m)
            assert len(seqs) <= max_tiles(N, B, block_m)                       # the static grid is enough
            covered = []
            for s, r in zip(seqs, rows):
                assert qstart[s] <= r < qstart[s + 1]                          # the tile starts in its sequence
                covered += range(r, min(r + block_m, qstart[s + 1]))           # ...and stops at its end
            assert sorted(covered) == list(range(N))                          # every row exactly once
            keys = [ctx[s] - qstart[s + 1] + min(r + block_m, qstart[s + 1]) for s, r in zip(seqs, rows)]
            assert keys == sorted(keys, reverse=True)                         # heaviest tiles first


def test_token_buckets_and_static_buffers():
    assert token_buckets(1) == [1]
    assert token_buckets(300) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    b = token_buckets(8192)
    assert b[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512] and b[-1] == 8192 and len(b) == 25
    assert all(y - x == 512 for x, y in zip(b[9:], b[10:]))
    assert token_buckets(1000)[-1] == 1024
    assert tile_rows_for(256) == 16 and tile_rows_for(257) == 64 and tile_rows_for(8192) == 64

    buf = StepBuffers(8, max_num_seqs=4, max_blocks=3, device="cpu")
    assert buf.num_seqs == 4 and buf.views["block_tables"].shape == (4, 3)
    a = lambda *xs: np.array(xs, dtype=np.int64)   # noqa: E731
    staging = Staging(buf.size + 5, pinned=False)                        # shared by buckets: the largest's size
    buf.load({"input_ids": a(5, 6, 7), "positions": a(0, 1, 9), "slot_mapping": a(40, 41, 77),
              "logits_indices": a(1, 2), "context_lens": a(2, 10), "query_start": a(0, 2, 3),
              "block_tables": np.array([[3, 0], [4, 7]]), "tile_seq": a(0, 1), "tile_row": a(0, 2),
              "num_tiles": a(2)}, staging)
    v = buf.views
    assert v["input_ids"].tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert v["slot_mapping"].tolist() == [40, 41, 77, 0, 0, 0, 0, 0]      # padded rows: the null block
    assert v["logits_indices"].tolist() == [1, 2, 0, 0]
    assert v["num_tiles"].tolist() == [2]
    assert v["block_tables"].tolist() == [[3, 0, 0], [4, 7, 0], [0, 0, 0], [0, 0, 0]]
    assert staging.images[0][:3].tolist() == [5, 6, 7] and staging.turn == 1
    buf.load({"input_ids": a(9)}, staging)                                # a new step leaves nothing behind
    assert v["input_ids"].tolist() == [9, 0, 0, 0, 0, 0, 0, 0] and v["block_tables"].abs().sum() == 0
    assert staging.images[1][:1].tolist() == [9] and staging.images[0][:3].tolist() == [5, 6, 7]   # in turns
    ring = Staging(buf.size, pinned=False, images=5)                     # a ring: each image again after five steps
    for step in range(12):
        buf.load({"input_ids": a(100 + step)}, ring)
    assert [im[0] for im in ring.images] == [110, 111, 107, 108, 109] and ring.turn == 2
    with pytest.raises(ValueError, match="at least 2 images"):
        Staging(8, pinned=False, images=1)


def test_triton_config_errors():
    from course_lib.engine import LLM

    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            LLM("tiny", device="cpu", attention="triton")
    with pytest.raises(ConfigError, match="cuda_graphs must be True or False"):
        LLM("tiny", device="cpu", cuda_graphs="full")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        LLM("tiny", device="cpu", cuda_graphs=True, attention="torch")


# ---------------------------------------------------------------------- the kernels, interpreted
KERNELS = r"""
import torch
from course_lib.engine.triton_unified import unified_attention, build_tiles, max_tiles
from course_lib.engine.attention import gather_keys
from course_lib.engine.kv_cache import PagedKVCache
from course_lib.config import GPTConfig

torch.manual_seed(0)
# (query rows, keys): decodes, fresh prefills, a cached prefix, a chunk in the middle of a prompt
MIX = [(1, 1), (1, 40), (23, 23), (5, 5), (17, 70), (1, 9), (40, 95), (16, 16)]
cases = [(2, 32, 1, torch.float32, 16), (2, 32, 7, torch.bfloat16, 64), (2, 64, 16, torch.float32, 64),
         (2, 64, 7, torch.float32, 16), (1, 64, 1, torch.bfloat16, 16), (2, 32, 16, torch.bfloat16, 16)]
for case, (H, D, bs, dtype, block_m) in enumerate(cases):
    cfg = GPTConfig(vocab_size=50, n_positions=128, n_embd=H * D, n_layer=1, n_head=H)
    num_blocks = sum(-(-c // bs) for _, c in MIX) + 5
    kv = PagedKVCache(cfg, num_blocks=num_blocks, block_size=bs, dtype=dtype)
    kv.pool.normal_()
    kv.pool[:, :, 0] = float("nan")                    # the null block: never read
    perm = torch.randperm(num_blocks)[:sum(-(-c // bs) for _, c in MIX)] + 1   # scattered blocks
    need = [-(-c // bs) for _, c in MIX]
    tables = torch.zeros(len(MIX), max(need) + 2, dtype=torch.int32)         # padded with the null block
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[at:at + n].to(torch.int32)
        at += n
    qstart = [0]
    for q, _ in MIX:
        qstart.append(qstart[-1] + q)
    ctx = [c for _, c in MIX]
    N, pad = qstart[-1], 5                              # 5 padded rows past the live ones
    q = torch.randn(N + pad, H, D, dtype=dtype)
    seqs, rows = build_tiles(qstart, ctx, block_m)
    grid = max_tiles(N + pad, len(MIX), block_m) + 3    # more programs than tiles: the extra ones exit
    as_t = lambda xs: torch.tensor(xs + [0] * (grid - len(xs)), dtype=torch.long)
    out = torch.full_like(q, float("nan"))              # poison: every live row must be written
    unified_attention(q, kv.k[0], kv.v[0], tables, torch.tensor(ctx, dtype=torch.int32),
                      torch.tensor(qstart, dtype=torch.int32), as_t(seqs), as_t(rows),
                      torch.tensor([len(seqs)]), grid, block_m, out=out,
                      block_n=16 if case % 2 else None)   # many short key trips, or the default
    assert not out[:N].isnan().any(), (H, D, bs, dtype, "a live row was not written")
    assert out[N:].isnan().all(), "padded rows belong to no tile and stay untouched"
    for i, (a, b) in enumerate(zip(qstart, qstart[1:])):   # scores, causal mask, softmax, @ V by hand
        keys, values = (t.float() for t in gather_keys(kv, 0, tables[i].long(), ctx[i]))
        scores = torch.einsum("nhd,shd->hns", q[a:b].float(), keys) / D ** 0.5
        pos = torch.arange(ctx[i] - (b - a), ctx[i])[:, None]
        weights = scores.masked_fill(torch.arange(ctx[i])[None, :] > pos, float("-inf")).softmax(-1)
        ref = torch.einsum("hns,shd->nhd", weights, values)
        err = (out[a:b].float() - ref).abs().max().item()
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), (H, D, bs, dtype, block_m, i, err)
    print("case", H, D, bs, str(dtype), block_m, "ok")

# the K/V write kernel == index_copy_, from strided views of a fused QKV output
from course_lib.engine.triton_cache_write import write_kv
for H, D, dtype in [(3, 16, torch.float32), (25, 64, torch.bfloat16)]:
    qkv = torch.randn(11, 3 * H * D, dtype=dtype)
    q, k, v = (t.view(11, H, D) for t in qkv.split(H * D, dim=1))
    cfg = GPTConfig(vocab_size=50, n_positions=80, n_embd=H * D, n_layer=1, n_head=H)
    a, b = PagedKVCache(cfg, num_blocks=6, block_size=4, dtype=dtype), PagedKVCache(cfg, num_blocks=6, block_size=4, dtype=dtype)
    slots = torch.randperm(24)[:11] + 4
    a.write(0, k, v, slots)
    write_kv(k, v, slots, b.k[0], b.v[0])
    assert torch.equal(a.pool, b.pool) and b.pool.abs().sum() > 0
print("kernels ok")
"""

ENGINE = r"""
import torch
from course_lib.engine import LLM, SamplingParams
from course_lib.engine.attention import TritonAttention
from course_lib.tiny import load_tiny

model, tok = load_tiny()                      # trained: its next tokens depend on attention
base = tok.encode("The for statement is used to iterate over the elements")[:20]
prompts = [tok.encode(t) for t in ("def ", "Return the", "The while statement", "import os\n")]
prompts += [base + tok.encode(" of a"), base + [17], base[:13]]   # shared prefixes: cache hits
p = SamplingParams(max_tokens=7, ignore_eos=True)
want = [o.token_ids for o in LLM(model, device="cpu", block_size=4, attention="torch").generate(prompts, p)]

# chunked prefill, prefix hits and a pool small enough to preempt, through the unified kernel
llm = LLM(model, device="cpu", block_size=4, attention="triton", max_num_batched_tokens=16, num_kv_blocks=16)
assert [o.token_ids for o in llm.generate(prompts, p)] == want
eng = llm.engine
assert eng.scheduler.num_preemptions > 0 and eng.block_manager.num_hit_tokens > 0
assert any(r.num_prefill_tokens and r.num_decode_tokens for r in eng.ledger.records)    # mixed steps
print("engine ok", eng.scheduler.num_preemptions, eng.block_manager.num_hit_tokens)

# whole-step graphs with an eager stand-in for the CUDA graph (the CPU has none): the static
# buffers, buckets, padding and tile tables of every step, replayed through the same forward
from course_lib.engine.step_graphs import StepGraphs

llm = LLM(model, device="cpu", block_size=4, attention="triton", max_num_batched_tokens=24, max_num_seqs=6,
          decode_burst=3)                            # bursts replay the graphs too, each step laid out from the last
runner = llm.engine.runner
graphs = StepGraphs(runner, 24, 6, 128 // 4)
replays = []
shared_logits = torch.zeros(6, model.config.vocab_size)    # one logits buffer for every graph, as captured

class EagerGraph:
    def __init__(self, N, buf):
        self.N, self.buf, self.batch = N, buf, graphs.static_batch(buf)
        self.out = shared_logits[:self.batch.logits_indices.shape[0]]

    def replay(self):                              # what the capture records: forward, then the argmax
        replays.append(self.N)
        assert self.batch.input_ids.shape[0] == self.N
        graphs.step(self.buf, self.batch, self.out)

# padded rows' attention output is never written (the buffer's old contents stay): NaN there must
# not reach a live row
attend, runner_slots = runner.attention.forward, [None]
def garbage_in_padding(q, k, v, kv, layer, meta):
    out = attend(q, k, v, kv, layer, meta)
    padding = runner_slots[0] == 0                 # slot 0 lies in the null block: only padded rows write it
    out[padding] = float("nan")
    return out
runner.attention.forward = garbage_in_padding
_forward = runner.forward
def forward_noting_slots(b, logits_out=None):
    runner_slots[0] = b.slot_mapping
    return _forward(b, logits_out=logits_out)
runner.forward = forward_noting_slots

for N, buf in graphs.buffers.items():
    g = EagerGraph(N, buf)
    graphs.graphs[N] = (g, g.out)
runner.step_graphs = graphs
bursts, issue = [], llm.engine._forward
llm.engine._forward = lambda flat, seqs, steps: (bursts.append(steps), issue(flat, seqs, steps))[1]
assert [o.token_ids for o in llm.generate(prompts, p)] == want
assert max(bursts) == 3, bursts                        # a graph's tokens, kept step by step within a burst
assert set(replays) <= set(graphs.buffers) and len(set(replays)) >= 3 and 1 in replays, replays
assert max(replays) == 32                              # 24-token steps run padded in the 32 bucket
assert llm.engine.kv_cache.pool[:, :, 0].ne(0).any()      # padded rows wrote to the null block (NaN too)...
llm.engine.kv_cache.pool[:, :, 0] = float("nan")          # ...which no real row ever reads
assert [o.token_ids for o in llm.generate(prompts, p)] == want
print("step graphs ok", sorted(set(replays)))

# teeth: with the kernel's output zeroed the same comparison fails for most prompts
TritonAttention.forward = lambda self, q, k, v, kv, layer, meta: torch.zeros_like(q)
got = [o.token_ids for o in LLM(model, device="cpu", block_size=4, attention="triton").generate(prompts, p)]
assert sum(g != w for g, w in zip(got, want)) >= len(prompts) // 2, "these prompts do not depend on attention"
print("sabotage caught")
"""


def _interpret(script: str, marker: str):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert marker in r.stdout
    return r.stdout


def test_unified_and_write_kernels_match_references_in_interpreter():
    pytest.importorskip("triton")
    _interpret(KERNELS, "kernels ok")


def test_engine_with_unified_kernel_and_step_graphs_in_interpreter():
    pytest.importorskip("triton")
    _interpret(ENGINE, "sabotage caught")
