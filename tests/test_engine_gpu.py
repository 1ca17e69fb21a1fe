"""The engine on an NVIDIA GPU: the unified Triton kernel, whole-step CUDA graphs, bf16 and fp32
against transformers. Skipped without CUDA.

bf16 changes rounding, so two correct engines may pick different tokens where the top two
logits are nearly tied. The rule: most prompts give identical tokens;
where one does not, at the first difference each engine's token is in the other's top 5 with
close log-probabilities (after a difference the continuations legitimately part).
"""

import os
import time

import numpy as np
import pytest
import torch

from conftest import random_model
from course_lib import checkpoint
from course_lib.config import GPTConfig
from course_lib.engine import LLM, EngineConfig, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=2003, n_positions=512, n_embd=256, n_layer=4, n_head=4)
LENS = [1, 5, 17, 31, 64, 100, 127, 150, 199, 230, 255, 256, 300, 333, 380, 401]
MAX_TOKENS = [24, 16, 40, 8, 32, 20, 12, 48, 30, 10, 18, 26, 14, 36, 22, 28]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = random_model(GPTConfig(**CONFIG), seed=11)
    return checkpoint.save(model, tmp_path_factory.mktemp("gpu_ckpt"))


def _prompts(seed=0, lens=LENS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CONFIG["vocab_size"], (n,), generator=g).tolist() for n in lens]


def _hf(directory, dtype, prompts, max_tokens):
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa").cuda().eval()
    out = []
    for p, m in zip(prompts, max_tokens):
        ids = torch.tensor([p], device="cuda")
        with torch.no_grad():
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=m,
                            min_new_tokens=m, eos_token_id=None, pad_token_id=0, output_scores=True,
                            return_dict_in_generate=True)
        tokens = g.sequences[0, len(p):].tolist()
        logp = [torch.log_softmax(s[0].float(), -1) for s in g.scores]      # per step (V,)
        out.append((tokens, logp))
    return out


def _check_close(ours, hf, atol):
    """Tokens equal, or at the first difference each in the other's top 5 with close log-probs.
    Returns how many prompts gave identical tokens."""
    identical = 0
    for (toks, lps), (htoks, hlps) in zip(ours, hf):
        if toks == htoks:
            identical += 1
            continue
        i = next(j for j, (a, b) in enumerate(zip(toks, htoks)) if a != b)
        a, b = toks[i], htoks[i]
        hf_top5 = torch.topk(hlps[i], 5).indices.tolist()
        ours_top = sorted(lps[i], key=lps[i].get, reverse=True)[:5]
        assert a in hf_top5 and b in ours_top, (i, a, b, hf_top5, ours_top)
        assert abs(hlps[i][a].item() - hlps[i][b].item()) < atol         # a near tie for HF
        assert abs(lps[i][a] - lps[i][b]) < atol                         # and for us
    return identical


def _engine(llm, prompts, max_tokens):
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, logprobs=5, ignore_eos=True) for m in max_tokens])
    return [(o.token_ids, o.logprobs) for o in outs]


# ---------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("block_size,block_m", [(16, 64), (7, 16), (1, 64), (16, 128)])
def test_gpu_unified_kernel_matches_an_explicit_softmax(dtype, tol, block_size, block_m):
    """GPT-2 XL's heads (25 x 64): decodes, fresh prefills, cached prefixes and chunks in one launch."""
    from course_lib.engine.attention import gather_keys
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
    for i, (a, b) in enumerate(zip(qstart, qstart[1:])):
        keys, values = (t.float() for t in gather_keys(kv, 0, tables[i].long(), ctx[i]))
        scores = torch.einsum("nhd,shd->hns", q[a:b].float(), keys) / 8.0
        pos = torch.arange(ctx[i] - (b - a), ctx[i], device="cuda")[:, None]
        weights = scores.masked_fill(torch.arange(ctx[i], device="cuda")[None, :] > pos, float("-inf")).softmax(-1)
        ref = torch.einsum("hns,shd->nhd", weights, values)
        assert (out[a:b].float() - ref).abs().max().item() < tol, (i, mix[i])



@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_gpu_split_kv_merges_in_the_same_launch_over_many_replays(dtype, tol):
    """Split-KV's merge by the last program to arrive (triton_unified.py): 48 launches back to back in
    one CUDA graph share one counter buffer, as an engine's layers and steps do, and the graph is
    replayed 20 times. Every launch gives the unsplit kernel's output and leaves the counters at 0;
    a merge that ran before every chunk's partial was stored, or a counter left non-zero, shows here."""
    from course_lib.engine.attention import TritonAttention
    from course_lib.engine.kv_cache import PagedKVCache
    from course_lib.engine.triton_unified import build_tiles, max_tiles, unified_attention

    torch.manual_seed(0)
    H, Dh, bs, launches = 25, 64, 16, 48
    mix = [(1, 576), (1, 37), (1, 2000), (1, 1)]                 # decodes: one row each
    cfg = GPTConfig(vocab_size=50, n_positions=2048, n_embd=H * Dh, n_layer=1, n_head=H)
    need = [-(-c // bs) for _, c in mix]
    kv = PagedKVCache(cfg, num_blocks=sum(need) + 1, block_size=bs, dtype=dtype, device="cuda")
    kv.pool.normal_()
    tables = torch.zeros(len(mix), max(need), dtype=torch.int32)
    at = 1
    for i, n in enumerate(need):
        tables[i, :n] = torch.arange(at, at + n, dtype=torch.int32)
        at += n
    ctx = [c for _, c in mix]
    seqs, rows = build_tiles(list(range(len(mix) + 1)), ctx, 16)
    grid = max_tiles(len(mix), len(mix), 16)
    args = [tables.cuda(), torch.tensor(ctx, device="cuda"), torch.arange(len(mix) + 1, device="cuda"),
            torch.tensor(seqs, device="cuda"), torch.tensor(rows, device="cuda"),
            torch.tensor([len(seqs)], device="cuda"), grid, 16]
    q = torch.randn(launches, len(mix), H, Dh, device="cuda", dtype=dtype)
    plain = torch.stack([unified_attention(q[i], kv.k[0], kv.v[0], *args) for i in range(launches)])
    counters = TritonAttention(32).split_counters(torch.device("cuda"))
    for splits in (22, 5):
        out = torch.full_like(q, float("nan"))
        run = lambda: [unified_attention(q[i], kv.k[0], kv.v[0], *args, out=out[i], num_splits=splits,   # noqa: E731
                                         split_counters=counters) for i in range(launches)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()                                                   # compile outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        for replay in range(20):
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            err = (out.float() - plain.float()).abs().max().item()
            assert err < tol, (splits, replay, err)
            assert not counters.any(), (splits, replay, counters.nonzero())


# ---------------------------------------------------------------------- whole-step graphs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_graph_replay_is_bitwise_the_eager_forward(ckpt, dtype):
    """A captured step replays exactly the kernels of the eager forward on the same buffers: the
    logits are equal bit for bit, for a mixed step (decodes + prefill chunk + cached prefix), and
    the greedy tokens it ends with are torch.argmax's."""
    from course_lib.engine.batch import COMMON_ARRAYS, build_flat_batch

    llm = LLM(ckpt, device="cuda", dtype=dtype, max_num_batched_tokens=256, max_num_seqs=8, num_kv_blocks=256)
    eng = llm.engine
    graphs = eng.runner.step_graphs
    assert graphs is not None and eng.runner.attention.name == "triton"
    prompts = _prompts(seed=4, lens=[40, 90, 200, 7])
    for ids in prompts:
        eng.add_request(ids, SamplingParams(max_tokens=30, ignore_eos=True))
    checked = 0
    while eng.has_unfinished() and checked < 12:
        sched = eng.scheduler.schedule()
        flat = build_flat_batch(sched.scheduled, eng.config.block_size)
        N = next(n for n, b in graphs.buffers.items() if b.fits(flat))
        buf = graphs.buffers[N]
        R = len(flat.logits_indices)
        buf.load({**{n: flat.arrays()[n] for n in COMMON_ARRAYS}, "num_logits": np.array([R]),
                  **eng.runner.attention.extra_arrays(flat, block_m=buf.block_m)}, graphs.staging)
        graph, logits = graphs.graphs[N]
        eager = logits.new_empty(logits.shape[0], eng.runner.logits_width)   # the head's padded width
        eng.runner.forward(graphs.static_batch(buf), logits_out=eager)      # the same kernels, run eagerly
        eager = eager[:R, :logits.shape[1]]
        eng.runner.sampled_tokens.fill_(-1)
        graph.replay()
        assert torch.equal(logits[:R], eager), f"step {checked} (bucket {N})"
        # the graph's last kernel: torch.argmax's tokens (first of equal logits) for the live rows only
        tokens = eng.runner.sampled_tokens
        assert torch.equal(tokens[:R], eager.argmax(-1)) and (tokens[R:] == -1).all(), f"step {checked}"
        from course_lib.engine.sampler import sample

        seqs = [s.seq for s in flat.seqs if s.needs_logits]
        for seq, tok in zip(seqs, sample(eager, seqs).read()[0]):
            seq.append_token(tok, 0.0)
        eng.scheduler.finish_step(sched)
        checked += 1
    assert checked == 12


def test_gpu_graphs_and_eager_engines_agree(ckpt):
    """The engine with and without graphs (eager steps have their own shapes, so cuBLAS may round
    differently): identical tokens for nearly every prompt, close log-probabilities."""
    prompts = _prompts(seed=2)
    params = [SamplingParams(max_tokens=12, logprobs=1, ignore_eos=True)] * len(prompts)
    a = LLM(ckpt, device="cuda", dtype="float32", max_num_seqs=8, num_kv_blocks=512).generate(prompts, params)
    b = LLM(ckpt, device="cuda", dtype="float32", cuda_graphs=False, max_num_seqs=8,
            num_kv_blocks=512).generate(prompts, params)
    assert sum(x.token_ids == y.token_ids for x, y in zip(a, b)) >= len(prompts) - 1
    for x, y in zip(a, b):
        for la, lb in zip(x.logprobs, y.logprobs):
            if x.token_ids != y.token_ids:
                break
            assert all(abs(la[t] - lb[t]) < 1e-4 for t in la.keys() & lb.keys())


# ---------------------------------------------------------------------- against transformers
def test_gpu_bf16_matches_transformers(ckpt):
    prompts = _prompts()
    llm = LLM(ckpt, device="cuda", dtype="bfloat16", block_size=16, max_num_batched_tokens=512, max_num_seqs=16,
              num_kv_blocks=1024)
    assert llm.engine.runner.step_graphs is not None           # the default: whole-step graphs
    ours = _engine(llm, prompts, MAX_TOKENS)
    identical = _check_close(ours, _hf(ckpt, torch.bfloat16, prompts, MAX_TOKENS), atol=0.25)
    assert identical > len(prompts) // 2, f"only {identical} of {len(prompts)} prompts identical"   # 11 on an H200


@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_gpu_fp32_block_sizes_prefix_and_preemption(ckpt, block_size):
    shared = _prompts(seed=5, lens=[160])[0]
    prompts = [(shared + p)[:480] for p in _prompts(seed=6, lens=[1, 5, 17, 31, 64, 100, 127, 150])]
    max_tokens = [min(m, 512 - len(p)) for p, m in zip(prompts, MAX_TOKENS)]
    need = max(-(-(len(p) + m) // block_size) for p, m in zip(prompts, max_tokens))
    llm = LLM(ckpt, device="cuda", dtype="float32", block_size=block_size,
              num_kv_blocks=need + 48 // block_size + 1,        # small enough to preempt at all three sizes
              max_num_batched_tokens=256, max_num_seqs=8)
    ours = _engine(llm, prompts, max_tokens)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_hit_tokens > 0
    assert any(r.num_prefill_tokens and r.num_decode_tokens for r in llm.ledger.records)
    identical = _check_close(ours, _hf(ckpt, torch.float32, prompts, max_tokens), atol=0.01)
    assert identical >= len(prompts) - 1


def test_gpu_tiny_model_equals_cpu_and_depends_on_attention(monkeypatch):
    """The trained tiny model in fp32 gives the CPU engine's tokens; with the kernel's output
    zeroed most prompts change (so the comparison can fail)."""
    from course_lib.engine.attention import TritonAttention
    from course_lib.tiny import load_tokenizer

    tok = load_tokenizer()
    prompts = [tok.encode(t) for t in ("def ", "The for statement", "Return the number of", "import os\n",
                                        "class A:\n    def __init__(self", "If the value is")]
    p = SamplingParams(max_tokens=20, ignore_eos=True)
    want = [o.token_ids for o in LLM("tiny", device="cpu").generate(prompts, p)]
    got = [o.token_ids for o in LLM("tiny", device="cuda", dtype="float32").generate(prompts, p)]
    assert sum(g == w for g, w in zip(got, want)) >= len(prompts) - 1
    monkeypatch.setattr(TritonAttention, "forward", lambda self, q, k, v, kv, layer, meta: torch.zeros_like(q))
    broken = [o.token_ids for o in LLM("tiny", device="cuda", dtype="float32").generate(prompts, p)]
    assert sum(b != w for b, w in zip(broken, want)) >= len(prompts) // 2


def test_gpu_memory_fraction_sizes_the_pool(ckpt):
    llm = LLM(ckpt, device="cuda", dtype="bfloat16", gpu_memory_fraction=0.3, max_num_seqs=4)
    total = torch.cuda.mem_get_info()[1]
    assert llm.engine.kv_cache.nbytes() <= 0.3 * total
    assert llm.engine.block_manager.num_blocks > 1000
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5


def test_gpu_config_errors(ckpt):
    from course_lib.errors import ConfigError

    with pytest.raises(ConfigError, match="only attention='triton'"):
        LLM(ckpt, device="cuda", cuda_graphs=True, attention="torch", num_kv_blocks=64)
    llm = LLM(ckpt, device="cuda", attention="torch", num_kv_blocks=64)     # the torch path runs eagerly on CUDA
    assert llm.engine.runner.step_graphs is None
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3))[0].token_ids) == 3


# ---------------------------------------------------------------------- tensor parallel over NCCL
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_tensor_parallel_two_gpus_fp32_equals_one_and_bf16_matches_transformers(ckpt):
    """Two ranks on cuda:0 and cuda:1, NCCL all-reduces inside the whole-step CUDA graphs.
    fp32: the tokens of one GPU for every prompt but at most one, and that one parts at a near tie
    (the all-reduce adds the two halves of each sum in another order); bf16: the rule above
    against transformers."""
    prompts = _prompts(seed=7)
    options = dict(device="cuda", block_size=16, max_num_batched_tokens=512, max_num_seqs=16, num_kv_blocks=1024)
    one = _engine(LLM(ckpt, dtype="float32", **options), prompts, MAX_TOKENS)
    two = LLM(ckpt, dtype="float32", tensor_parallel_size=2, **options)
    assert two.engine.runner.step_graphs is not None and two.engine.kv_cache.num_heads == CONFIG["n_head"] // 2
    pids = two.engine.tp.pids
    assert _check_close(_engine(two, prompts, MAX_TOKENS), one, atol=1e-3) >= len(prompts) - 1
    two.shutdown()
    for pid in pids:                                              # the worker has ended
        with pytest.raises(ProcessLookupError):
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.1)
    bf16 = LLM(ckpt, dtype="bfloat16", tensor_parallel_size=2, **options)
    ours = _engine(bf16, prompts, MAX_TOKENS)
    bf16.shutdown()
    identical = _check_close(ours, _hf(ckpt, torch.bfloat16, prompts, MAX_TOKENS), atol=0.25)
    assert identical > len(prompts) // 2, f"only {identical} of {len(prompts)} prompts identical"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_tensor_parallel_worker_fault_is_a_clear_error(ckpt):
    from course_lib.engine.tensor_parallel import TensorParallelError

    llm = LLM(ckpt, device="cuda", dtype="bfloat16", tensor_parallel_size=2, max_num_batched_tokens=256,
              num_kv_blocks=256)
    llm.engine.tp.inject_fault(1)
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match="fault injected on rank 1"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3))
    assert time.monotonic() - t0 < 60


def _same_tokens_and_logprobs(runs):
    """``runs``: {True: (outputs, engine), False: (outputs, engine)} of the same requests: token for
    token equal, log-probabilities within 1e-4, and the run exercised preemption and prefix hits."""
    (a, eng), (b, _) = runs[True], runs[False]
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    for x, y in zip(a, b):
        for p, q in zip(x.logprobs, y.logprobs):
            assert p.keys() == q.keys() and all(abs(p[k] - q[k]) < 1e-4 for k in p)
    assert eng.scheduler.num_preemptions > 0 and eng.block_manager.num_hit_tokens > 0


# ---------------------------------------------------------------------- asynchronous scheduling
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_async_scheduling_gives_the_tokens_of_sync_with_graphs(ckpt, dtype):
    """With CUDA graphs on (decode rows take their id inside the graph from the last step's sampled
    tokens): async on == off, token for token, with chunks, prefix hits and preemption in the run."""
    shared = _prompts(seed=7, lens=[48])[0]
    prompts = [shared + p for p in _prompts(seed=8, lens=LENS[:10])] + _prompts(seed=9, lens=LENS[10:])
    params = [SamplingParams(max_tokens=m, ignore_eos=True, logprobs=1) for m in MAX_TOKENS]
    runs = {}
    for on in (True, False):
        llm = LLM(ckpt, device="cuda", dtype=dtype, max_num_batched_tokens=256, max_num_seqs=8, num_kv_blocks=96,
                  async_scheduling=on)
        assert llm.engine.runner.step_graphs is not None and llm.engine.lag == int(on)
        runs[on] = (llm.generate(prompts, params), llm.engine)
    _same_tokens_and_logprobs(runs)


def test_gpu_async_issues_the_next_step_before_reading_and_never_syncs_elsewhere(ckpt):
    """Structural, timing-free: in every call the step's graph replay is issued before the previous
    step's tokens are read, and nothing outside that read waits for the device (torch's sync debug
    mode raises on any synchronising operation: a .tolist(), .item(), a blocking copy)."""
    from course_lib.engine.engine import LLMEngine
    from course_lib.engine.step_graphs import StepGraphs

    # no prefix cache: the timed run then computes the same steps as the warm-up run, so the tokens
    # match bit for bit (with it, the rerun's steps would be smaller, take other kernels, and round
    # differently in bf16)
    llm = LLM(ckpt, device="cuda", dtype="bfloat16", max_num_batched_tokens=256, max_num_seqs=8, num_kv_blocks=256,
              enable_prefix_caching=False)
    prompts = _prompts(seed=3, lens=[40, 90, 7, 120])
    params = [SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2)] * len(prompts)
    want = [o.token_ids for o in llm.generate(prompts, params)]           # warm: graphs, kernels, pinned memory
    order = []
    real_run, real_learn = StepGraphs.run, LLMEngine._learn

    def run(self, flat):
        order.append("replay")
        return real_run(self, flat)

    def learn(self, step):
        order.append("read")
        torch.cuda.set_sync_debug_mode(0)          # the one intended wait: reading a step's tokens
        try:
            return real_learn(self, step)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    StepGraphs.run, LLMEngine._learn = run, learn
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        StepGraphs.run, LLMEngine._learn = real_run, real_learn
    assert got == want
    steps = order.count("replay")
    # 12 tokens each: at least 12 steps (13 here: the 257 prompt tokens need two steps of 256)
    assert steps >= 12 and order == ["replay"] + ["replay", "read"] * (steps - 1) + ["read"]


# ---------------------------------------------------------------------- decode bursts
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_decode_bursts_give_the_tokens_of_single_steps_and_never_sync(ckpt, dtype, monkeypatch):
    """Bursts of 8 graph replays per scheduling (each step laid out from the one before, its ids fed
    on the device) give the tokens of single steps bit for bit — the same graphs run the same
    batches — and nothing but the read of a burst's tokens waits for the device."""
    from course_lib.engine.engine import LLMEngine
    from course_lib.engine.scheduler import Scheduler

    prompts = _prompts(seed=31, lens=[40, 90, 7, 120, 33])
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (20, 31, 12, 25, 17)]
    lengths, real_burst, real_learn = [], Scheduler.reserve_burst, LLMEngine._learn

    def reserve_burst(self, out, most):
        lengths.append(real_burst(self, out, most))
        return lengths[-1]

    def learn(self, step):
        torch.cuda.set_sync_debug_mode(0)          # the one intended wait: reading a step's tokens
        try:
            return real_learn(self, step)
        finally:
            torch.cuda.set_sync_debug_mode("error")
    monkeypatch.setattr(Scheduler, "reserve_burst", reserve_burst)
    monkeypatch.setattr(LLMEngine, "_learn", learn)
    got = {}
    for burst in (1, 8):
        llm = LLM(ckpt, device="cuda", dtype=dtype, max_num_batched_tokens=256, max_num_seqs=8, num_kv_blocks=256,
                  enable_prefix_caching=False, decode_burst=burst)
        llm.generate(prompts, params)                                       # warm: kernels, pinned memory
        lengths.clear()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got[burst] = [o.token_ids for o in llm.generate(prompts, params)]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert max(lengths) == burst
    assert got[1] == got[8]
    assert EngineConfig(device="cuda").resolve(GPTConfig(**CONFIG)).decode_burst == 8   # the CUDA default


# ---------------------------------------------------------------------- programmatic dependent launch
def test_gpu_pdl_on_and_off_give_the_same_tokens_fp32(ckpt, monkeypatch):
    """Our kernels launched with PDL (pdl.py: each starts while the one ahead finishes, weights
    loaded before the wait) compute what they compute without it: fp32 engines with PDL on and off
    agree token for token and in log-probabilities, with chunks, prefix hits and preemption."""
    from course_lib.engine import pdl
    from course_lib.engine.triton_gemv import RowsConfig

    if not pdl.pdl_enabled(torch.device("cuda")):
        pytest.skip("PDL needs compute capability 9.0 (Hopper) or newer")
    shared = _prompts(seed=21, lens=[48])[0]
    prompts = [shared + p for p in _prompts(seed=22, lens=LENS[:8])] + _prompts(seed=23, lens=LENS[8:])
    params = [SamplingParams(max_tokens=m, ignore_eos=True, logprobs=1) for m in MAX_TOKENS]
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(pdl, "ENABLED", on)
        llm = LLM(ckpt, device="cuda", dtype="float32", max_num_batched_tokens=256, max_num_seqs=8, num_kv_blocks=96)
        plan = llm.engine.runner.fused.plan(1, llm.engine.runner.model.transformer.h[0].mlp.c_fc.weight)
        assert isinstance(plan, RowsConfig) and pdl.pdl_enabled(torch.device("cuda")) == on   # one-trip row GEMVs
        runs[on] = (llm.generate(prompts, params), llm.engine)
    _same_tokens_and_logprobs(runs)


def test_gpu_cublaslt_bias_gelu_epilogue_is_the_tanh_gelu():
    """Many rows take cuBLASLt's bias + GELU epilogue (torch._addmm_activation): GPT-2's tanh GELU,
    not the erf one (they differ by up to ~5e-4 here, far above fp32 rounding)."""
    import torch.nn.functional as F
    from course_lib.engine.fused_forward import FusedForward

    class Runner:
        model = random_model(GPTConfig(**CONFIG), seed=3).cuda()
        fused_gelu = True
    ff = FusedForward(Runner)
    torch.manual_seed(0)
    x = torch.randn(300, 256, device="cuda") * 2
    w = torch.randn(256, 1024, device="cuda") / 16
    b = torch.randn(1024, device="cuda")
    assert ff.plan(300, w) is None                                  # 300 rows: cuBLAS
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        y = ff.linear(x, w, b, act=True)
        ref = x @ w + b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert (y - F.gelu(ref, approximate="tanh")).abs().max().item() < 1e-4
    assert (y - F.gelu(ref)).abs().max().item() > 1e-4


# ---------------------------------------------------------------------- the row GEMV
def test_gpu_row_gemvs_give_the_tokens_of_cublas_fp32(ckpt, monkeypatch):
    """The decode GEMVs of triton_gemv's row kernel (one or two rows on the CUDA cores, 3-16 on the
    tensor cores, split-K partials summed in add + LayerNorm) against cuBLAS for every projection:
    fp32 engines agree token for token and in log-probabilities, with chunks, prefix hits and
    preemption. The test model's shapes are not in the measured table, so the test puts them in."""
    from course_lib.engine import triton_gemv as G

    D, F = CONFIG["n_embd"], 4 * CONFIG["n_embd"]
    shapes = [(D, 3 * D), (D, D), (D, F), (F, D)]
    rows = {(K, N, True, M): G.RowsConfig(block_n=16 if M < 16 else 32, split=2 if K == F else 1, use_dot=True)
            for K, N in shapes for M in (8, 16)}
    shared = _prompts(seed=31, lens=[48])[0]
    prompts = [shared + p for p in _prompts(seed=32, lens=LENS[:8])] + _prompts(seed=33, lens=LENS[8:])
    params = [SamplingParams(max_tokens=m, ignore_eos=True, logprobs=1) for m in MAX_TOKENS]
    runs = {}
    for ours in (True, False):
        monkeypatch.setattr(G, "MEASURED", rows if ours else {(K, N, True, 64): None for K, N in shapes})
        monkeypatch.setattr(G, "ROWS_MAX_M", 2 if ours else 0)
        llm = LLM(ckpt, device="cuda", dtype="float32", max_num_batched_tokens=256, max_num_seqs=16, num_kv_blocks=96)
        runs[ours] = (llm.generate(prompts, params), llm.engine)
        plans = set(llm.engine.runner.fused._plans.values())
        assert any(isinstance(p, G.RowsConfig) and p.use_dot for p in plans) == ours
        assert any(isinstance(p, G.RowsConfig) and not p.use_dot for p in plans) == ours
    _same_tokens_and_logprobs(runs)


def test_gpu_fused_row_gemv_matches_torch_on_gpt2_shapes():
    """triton_gemv.gemv_fused compiled for the GPU on GPT-2 124M's and XL's shapes, bf16, with the
    config the engine plans for each (plan_gemv; shapes it leaves to cuBLAS or splits are not
    fused, so not tested here): the one- and two-row kernel with the LayerNorm before it, the GELU,
    the residual add and the QKV product's K/V write into a paged pool; the tensor-core path at 8,
    32 and 64 rows with the residual and the K/V write."""
    import torch.nn.functional as F
    from course_lib.engine.triton_gemv import KVWrite, fusable, gemv_fused, plan_gemv

    torch.manual_seed(0)
    bs, blocks = 16, 64
    dt = torch.bfloat16
    tested = set()

    def close(got, ref, what):
        err = (got.float() - ref).abs().max().item()
        assert err <= 1.6e-2 * ref.abs().max().item(), (what, err)

    for D, H in ((768, 12), (1600, 25)):
        ln = torch.nn.LayerNorm(D, device="cuda", dtype=dt)
        ln.weight.data.normal_(1.0, 0.2)
        ln.bias.data.normal_(0.0, 0.2)
        for M in (1, 2, 8, 32, 64):
            x = torch.randn(M, D, device="cuda", dtype=dt)
            h = F.layer_norm(x.float(), (D,), ln.weight.float(), ln.bias.float(), ln.eps).to(dt)
            for K, N in ((D, 3 * D), (D, 4 * D), (D, D), (4 * D, D)):
                cfg = plan_gemv(M, K, N, k_contiguous=True)
                if not fusable(cfg, K):
                    continue
                w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dt).t()     # K-contiguous, the engine's layout
                b = torch.randn(N, device="cuda", dtype=dt)
                inp = torch.randn(M, K, device="cuda", dtype=dt) if K != D else x
                res = torch.randn(M, N, device="cuda", dtype=dt)
                close(gemv_fused(inp, w, b, cfg, residual=res), res.float() + inp.float() @ w.float() + b.float(),
                      ("residual", D, M, K, N))
                tested.add(("residual", cfg.use_dot))
                if K != D:
                    continue
                if not cfg.use_dot:
                    close(gemv_fused(x, w, b, cfg, ln=ln, gelu=True),
                          F.gelu(h.float() @ w.float() + b.float(), approximate="tanh"), ("ln + gelu", D, M, N))
                    tested.add(("ln + gelu", False))
                if N == 3 * D:
                    k_pool = torch.zeros(blocks, bs, H, D // H, device="cuda", dtype=dt)
                    v_pool = torch.zeros_like(k_pool)
                    slots = torch.randperm(blocks * bs, device="cuda")[:M]
                    y = gemv_fused(h if cfg.use_dot else x, w, b, cfg, ln=None if cfg.use_dot else ln,
                                   kv_write=KVWrite(k_pool, v_pool, slots, start=D))
                    close(y, h.float() @ w.float() + b.float(), ("kv write", D, M))
                    assert torch.equal(k_pool.view(-1, D)[slots], y[:, D:2 * D])
                    assert torch.equal(v_pool.view(-1, D)[slots], y[:, 2 * D:])
                    assert int((k_pool.view(-1, D).abs().sum(1) > 0).sum()) == M     # no other slot written
                    tested.add(("kv write", cfg.use_dot))
    # every fusion the engine runs was reached, on both paths where it runs there
    assert tested >= {("residual", False), ("residual", True), ("ln + gelu", False), ("kv write", False),
                      ("kv write", True)}, tested


def test_gpu_planned_gemvs_match_torch_on_gpt2_shapes():
    """Every product the engine gives to our kernels on GPT-2 124M's and XL's shapes at 3-64 rows
    (plan_gemv: the row kernel on the tensor cores, the tile kernel in 16-, 32- or 64-row blocks, split-K
    partials, the padded LM head), bf16, against an fp32 product: whole (gemv, bias included) and as
    the split-K partials the engine sums in its add + LayerNorm."""
    from course_lib.engine.triton_gemv import GPT2_HEAD, gemv, gemv_partials, plan_gemv

    torch.manual_seed(0)
    dt = torch.bfloat16
    kinds = set()
    for D in (768, 1600):
        for K, N in ((D, 3 * D), (D, D), (D, 4 * D), (4 * D, D), (D, GPT2_HEAD)):
            w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dt).t()          # K-contiguous, the engine's layout
            b = None if N == GPT2_HEAD else torch.randn(N, device="cuda", dtype=dt)
            for M in (3, 4, 8, 16, 32, 64):
                cfg = plan_gemv(M, K, N, k_contiguous=True)
                if cfg is None:
                    continue
                x = torch.randn(M, K, device="cuda", dtype=dt)
                ref = x.float() @ w.float() + (0 if b is None else b.float())
                tol = 1.6e-2 * ref.abs().max().item()
                err = (gemv(x, w, b, config=cfg).float() - ref).abs().max().item()
                assert err <= tol, (D, K, N, M, cfg, err)
                err = (gemv_partials(x, w, cfg).sum(0) + (0 if b is None else b.float()) - ref).abs().max().item()
                assert err <= tol, ("partials", D, K, N, M, cfg, err)
                kinds.add((type(cfg).__name__, getattr(cfg, "block_m", None), cfg.split > 1))
    assert {("GemvConfig", 32, True), ("GemvConfig", 64, True), ("GemvConfig", 16, False),
            ("RowsConfig", None, False), ("RowsConfig", None, True)} <= kinds, kinds
