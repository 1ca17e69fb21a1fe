"""Whole-step CUDA graphs and the unified attention kernel on an NVIDIA GPU. Skipped without CUDA.

Same rules as tests/test_engine_gpu.py: graphs replay exactly what the eager forward computes, and
against transformers tokens are equal or part only at a near tie (each in the other's top 5).
"""

import pytest
import torch

from conftest import random_model
from course_lib import checkpoint
from course_lib.config import GPTConfig
from course_lib.engine import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
transformers = pytest.importorskip("transformers")

from test_engine_gpu import CONFIG, MAX_TOKENS, _check_close, _engine, _hf, _prompts  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = random_model(GPTConfig(**CONFIG), seed=11)
    return checkpoint.save(model, tmp_path_factory.mktemp("unified_ckpt"))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("block_size,block_m", [(16, 64), (7, 16), (1, 64)])
def test_gpu_unified_kernel_matches_reference(dtype, tol, block_size, block_m):
    """GPT-2 XL's heads (25 x 64): decodes, fresh prefills, cached prefixes and chunks in one launch."""
    from course_lib.engine.attention import TorchAttention
    from course_lib.engine.kv_cache import PagedKVCache
    from course_lib.engine.triton_unified import build_tiles, max_tiles, unified_attention

    torch.manual_seed(0)
    mix = [(1, 1), (1, 600), (1, 17), (300, 300), (64, 64), (130, 513), (1, 255), (77, 400), (1000, 1000)]
    cfg = GPTConfig(vocab_size=50, n_positions=1024, n_embd=25 * 64, n_layer=1, n_head=25)
    need = [-(-c // block_size) for _, c in mix]
    kv = PagedKVCache(cfg, num_blocks=sum(need) + 3, block_size=block_size, dtype=dtype, device="cuda")
    kv.pool.normal_()
    kv.pool[:, :, 0] = float("nan")                          # the null block is never read
    perm = torch.randperm(sum(need)) + 1
    tables = torch.zeros(len(mix), max(need), dtype=torch.int32)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[at:at + n].to(torch.int32)
        at += n
    tables = tables.cuda()
    qstart = [0]
    for q, _ in mix:
        qstart.append(qstart[-1] + q)
    ctx = [c for _, c in mix]
    N = qstart[-1]
    q = torch.randn(N + 7, 25, 64, device="cuda", dtype=dtype)
    seqs, rows = build_tiles(qstart, ctx, block_m)
    grid = max_tiles(N + 7, len(mix), block_m)
    as_t = lambda xs: torch.tensor(xs + [0] * (grid - len(xs)), device="cuda")   # noqa: E731
    out = torch.full_like(q, float("nan"))
    unified_attention(q, kv.k[0], kv.v[0], tables, torch.tensor(ctx, device="cuda"), torch.tensor(qstart, device="cuda"),
                      as_t(seqs), as_t(rows), torch.tensor([len(seqs)], device="cuda"), grid, block_m, out=out)
    assert not out[:N].isnan().any() and out[N:].isnan().all()

    class Batch:
        context_lens_host = ctx
        block_tables = tables
    ref = torch.cat([TorchAttention().prefill(q[a:b].float(), None, None, _float(kv), 0, Batch, i)
                     for i, (a, b) in enumerate(zip(qstart, qstart[1:]))])
    assert (out[:N].float() - ref).abs().max().item() < tol


def _float(kv):
    if kv.pool.dtype == torch.float32:
        return kv
    from course_lib.engine.kv_cache import PagedKVCache
    f = PagedKVCache.__new__(PagedKVCache)
    f.__dict__.update(kv.__dict__)
    f.pool = kv.pool.float()
    f.k = [f.pool[layer, 0] for layer in range(kv.config.n_layer)]
    f.v = [f.pool[layer, 1] for layer in range(kv.config.n_layer)]
    return f


def test_gpu_full_step_graphs_equal_eager(ckpt):
    """fp32: every step replayed from a graph == the same backend run eagerly, logit for logit."""
    prompts = _prompts(seed=2)[:10]
    params = [SamplingParams(max_tokens=12, logprobs=1, ignore_eos=True)] * 10
    full = LLM(ckpt, device="cuda", dtype="float32", cuda_graphs="full", max_num_seqs=8, max_num_batched_tokens=700,
               num_kv_blocks=512)
    runner = full.engine.runner
    assert runner.step_graphs is not None and runner.attention.name == "triton-unified"
    a = full.generate(prompts, params)
    eager = LLM(ckpt, device="cuda", dtype="float32", attention="triton-unified", cuda_graphs=False, max_num_seqs=8,
                max_num_batched_tokens=700, num_kv_blocks=512)
    b = eager.generate(prompts, params)
    ref = LLM(ckpt, device="cuda", dtype="float32", attention="sdpa", cuda_graphs=False, max_num_seqs=8,
              max_num_batched_tokens=700, num_kv_blocks=512).generate(prompts, params)
    for x, y, z in zip(a, b, ref):
        assert x.token_ids == y.token_ids
        for la, lb in zip(x.logprobs, y.logprobs):
            assert la.keys() == lb.keys() and all(abs(la[t] - lb[t]) < 1e-4 for t in la)
        if x.token_ids != z.token_ids:                # SDPA rounds differently: only ever at a near tie
            i = next(j for j, (s, t) in enumerate(zip(x.token_ids, z.token_ids)) if s != t)
            assert abs(x.logprobs[i][x.token_ids[i]] - z.logprobs[i][z.token_ids[i]]) < 1e-3
    steps = full.engine.ledger.records
    assert any(r.num_prefill_tokens and r.num_decode_tokens for r in steps)      # mixed steps were replayed


def test_gpu_full_graphs_bf16_match_transformers(ckpt):
    prompts = _prompts()
    llm = LLM(ckpt, device="cuda", dtype="bfloat16", cuda_graphs="full", block_size=16, max_num_batched_tokens=512,
              max_num_seqs=16, num_kv_blocks=1024)
    ours = _engine(llm, prompts, MAX_TOKENS)
    identical = _check_close(ours, _hf(ckpt, torch.bfloat16, prompts, MAX_TOKENS), atol=0.25)
    assert identical >= len(prompts) // 4, identical


@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_gpu_full_graphs_fp32_block_sizes_prefix_and_preemption(ckpt, block_size):
    shared = _prompts(seed=5, lens=[160])[0]
    prompts = [(shared + p)[:480] for p in _prompts(seed=6, lens=[1, 5, 17, 31, 64, 100, 127, 150])]
    max_tokens = [min(m, 512 - len(p)) for p, m in zip(prompts, MAX_TOKENS)]
    need = max(-(-(len(p) + m) // block_size) for p, m in zip(prompts, max_tokens))
    llm = LLM(ckpt, device="cuda", dtype="float32", cuda_graphs="full", block_size=block_size,
              num_kv_blocks=need + 48 // block_size + 1,        # small enough to preempt at all three sizes
              max_num_batched_tokens=256, max_num_seqs=8)
    ours = _engine(llm, prompts, max_tokens)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_hit_tokens > 0
    _check_close(ours, _hf(ckpt, torch.float32, prompts, max_tokens), atol=0.01)


def test_gpu_full_graphs_need_the_unified_backend(ckpt):
    from course_lib.errors import ConfigError

    with pytest.raises(ConfigError, match="triton-unified"):
        LLM(ckpt, device="cuda", cuda_graphs="full", attention="sdpa", num_kv_blocks=64)
    with pytest.raises(ConfigError, match="cuda_graphs='full'"):
        LLM(ckpt, device="cuda", cuda_graphs=True, attention="triton-unified", num_kv_blocks=64)
    llm = LLM(ckpt, device="cuda", attention="triton-unified", num_kv_blocks=64, max_num_batched_tokens=512)
    assert llm.engine.runner.step_graphs is not None               # None picks whole-step graphs for it
    assert llm.engine.runner.step_graphs.buckets[-1] == 512
