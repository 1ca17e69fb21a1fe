"""Invariant 6: the engine's greedy tokens == transformers' generate == the reference GPT.

For 18 prompts of mixed lengths, with chunked prefill on and off, block sizes 1, 16 and 7
(which divides none of the prompt lengths), prefix-cache hits, forced preemption and
streaming. CPU, float32, small random-weight checkpoints written with checkpoint.save.
"""

import pytest
import torch

from conftest import random_model
from course_lib import checkpoint
from course_lib.config import GPTConfig
from course_lib.engine import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=211, n_positions=64, n_embd=48, n_layer=2, n_head=3)
PROMPT_LENS = [1, 3, 5, 8, 9, 12, 15, 17, 20, 22, 23, 26, 29, 30, 33, 36, 38, 41]   # none divisible by 7
MAX_TOKENS = [6, 9, 4, 12, 7, 5, 10, 3, 8, 11, 6, 4, 9, 7, 5, 8, 10, 6]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    config = GPTConfig(**CONFIG)
    model = random_model(config, seed=5)
    return checkpoint.save(model, tmp_path_factory.mktemp("engine_ckpt")), model


def _prompts(seed=0, lens=PROMPT_LENS, shared_prefix=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lens:
        ids = torch.randint(0, CONFIG["vocab_size"], (n,), generator=g).tolist()
        out.append((shared_prefix or []) + ids)
    return out


def _params(max_tokens=MAX_TOKENS):
    return [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens]


@pytest.fixture(scope="module")
def hf_tokens(ckpt):
    """transformers' greedy generate, one prompt at a time (no padding involved)."""
    directory, _ = ckpt
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    cache = {}

    def run(prompts, max_tokens):
        out = []
        for p, m in zip(prompts, max_tokens):
            key = (tuple(p), m)
            if key not in cache:
                ids = torch.tensor([p])
                with torch.no_grad():
                    gen = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=m, min_new_tokens=m, eos_token_id=None, pad_token_id=0)
                cache[key] = gen[0, len(p):].tolist()
            out.append(cache[key])
        return out
    return run


def _ref_tokens(model, prompts, max_tokens):
    return [model.generate(torch.tensor([p]), m)[0, len(p):].tolist() for p, m in zip(prompts, max_tokens)]


def _engine_tokens(llm, prompts, max_tokens=MAX_TOKENS):
    return [o.token_ids for o in llm.generate(prompts, _params(max_tokens))]


def test_reference_equals_transformers(ckpt, hf_tokens):
    _, model = ckpt
    prompts = _prompts()
    assert _ref_tokens(model, prompts, MAX_TOKENS) == hf_tokens(prompts, MAX_TOKENS)


@pytest.mark.parametrize("block_size", [1, 16, 7])
@pytest.mark.parametrize("chunked", [True, False])
def test_greedy_equals_transformers(ckpt, hf_tokens, block_size, chunked):
    directory, _ = ckpt
    prompts = _prompts()
    # chunked: a budget of 16 tokens per step splits long prompts and mixes them with decodes
    llm = LLM(directory, block_size=block_size, enable_chunked_prefill=chunked,
              max_num_batched_tokens=16 if chunked else 64, max_num_seqs=8)
    got = _engine_tokens(llm, prompts)
    assert got == hf_tokens(prompts, MAX_TOKENS)
    records = llm.ledger.records
    assert any(r.num_prefill_tokens and r.num_decode_tokens for r in records), "no mixed prefill+decode step"
    if chunked:
        assert max(r.num_tokens for r in records) <= 16


def test_odd_block_size_and_small_budget(ckpt, hf_tokens):
    directory, _ = ckpt
    prompts = _prompts(seed=1)[:10]
    llm = LLM(directory, block_size=7, max_num_batched_tokens=24)
    assert _engine_tokens(llm, prompts, MAX_TOKENS[:10]) == hf_tokens(prompts, MAX_TOKENS[:10])


def test_prefix_cache_hits_keep_outputs(ckpt, hf_tokens):
    directory, _ = ckpt
    shared = _prompts(seed=9, lens=[21])[0]
    prompts = _prompts(seed=3, lens=PROMPT_LENS[:16], shared_prefix=shared)
    prompts = [p[:60] for p in prompts]
    max_tokens = [min(m, 64 - len(p)) for m, p in zip(MAX_TOKENS, prompts)]
    llm = LLM(directory, block_size=4, max_num_batched_tokens=64, max_num_seqs=4, snapshot=True)
    first = _engine_tokens(llm, prompts[:1], max_tokens[:1])            # fills the cache
    rest = _engine_tokens(llm, prompts[1:], max_tokens[1:])
    assert first + rest == hf_tokens(prompts, max_tokens)
    bm = llm.engine.block_manager
    assert bm.num_hit_tokens >= 15 * 20                                 # 5 full blocks of 4 per later prompt
    hits = {rid: n for s in llm.snapshots for rid, n in s.prefix_hits.items()}
    assert len(hits) == 15 and min(hits.values()) >= 20
    # the same prompts again: all their full blocks are hits now, outputs unchanged
    again = _engine_tokens(llm, prompts, max_tokens)
    assert again == first + rest


def test_prefix_cache_off_counts_no_hits(ckpt):
    directory, _ = ckpt
    prompts = _prompts(seed=3, lens=[5, 6], shared_prefix=list(range(20)))
    llm = LLM(directory, block_size=4, enable_prefix_caching=False)
    _engine_tokens(llm, prompts, [3, 3])
    assert llm.engine.block_manager.num_hit_tokens == 0


@pytest.mark.parametrize("block_size", [1, 7])
def test_forced_preemption_keeps_outputs(ckpt, hf_tokens, block_size):
    directory, _ = ckpt
    prompts = _prompts()
    need = max(-(-(len(p) + m - 1) // block_size) for p, m in zip(prompts, MAX_TOKENS))
    llm = LLM(directory, block_size=block_size, num_kv_blocks=need, max_num_batched_tokens=32,
              enable_prefix_caching=False, snapshot=True)   # room for the largest request only
    got = _engine_tokens(llm, prompts)
    assert got == hf_tokens(prompts, MAX_TOKENS)
    assert llm.engine.scheduler.num_preemptions > 0
    preempted = [rid for s in llm.snapshots for rid in s.preempted]
    assert preempted
    assert llm.engine.block_manager.num_free_blocks == need


def test_streaming_equals_generate(ckpt):
    directory, _ = ckpt
    prompts = _prompts(seed=4)[:8]
    llm = LLM(directory, block_size=7, max_num_batched_tokens=16)
    expected = _engine_tokens(llm, prompts, MAX_TOKENS[:8])
    streamed = [[] for _ in prompts]
    finished = set()
    for ev in llm.stream(prompts, _params(MAX_TOKENS[:8])):
        assert ev.index not in finished
        streamed[ev.index].append(ev.token_id)
        if ev.finished:
            finished.add(ev.index)
    assert streamed == expected and finished == set(range(8))


def test_stream_left_early_frees_blocks(ckpt):
    directory, _ = ckpt
    llm = LLM(directory, block_size=4, num_kv_blocks=40)
    for ev in llm.stream(_prompts(seed=5)[:4], SamplingParams(max_tokens=10)):
        break
    assert not llm.engine.has_unfinished()
    assert llm.engine.block_manager.num_free_blocks == 40


def test_engine_accepts_gpt_instance(ckpt):
    _, model = ckpt
    prompts = _prompts(seed=6)[:5]
    llm = LLM(model, block_size=16)
    assert _engine_tokens(llm, prompts, MAX_TOKENS[:5]) == _ref_tokens(model, prompts, MAX_TOKENS[:5])


def test_tiny_text_prompts_equal_reference():
    from course_lib.tiny import load_tiny

    model, tok = load_tiny()
    texts = ["def ", "The list", "Return the", "import sys\n", "class A:", "x = [", "if x is None",
             "Raises ValueError when", "a", "For example, the", "This module provides",
             "with open(", "print(", "The default value is", "See also", "True"]
    llm = LLM("tiny", block_size=16, max_num_batched_tokens=32)
    outs = llm.generate(texts, SamplingParams(max_tokens=10, ignore_eos=True))
    for text, out in zip(texts, outs):
        ids = torch.tensor([tok.encode(text)])
        ref = model.generate(ids, 10)[0, ids.shape[1]:].tolist()
        assert out.token_ids == ref
        assert out.text == tok.decode(ref)


@pytest.mark.parametrize("sabotage", ["zeros", "own value only"])
def test_these_weights_make_tokens_depend_on_attention(ckpt, hf_tokens, monkeypatch, sabotage):
    """The exact-token tests above have teeth: with attention broken — its output zeroed, or each
    row seeing only its own value (no cache, no other token) — most prompts' tokens change, so
    every exact comparison in this file would fail."""
    from course_lib.engine.attention import TorchAttention

    broken = {"zeros": lambda self, q, k, v, kv, layer, meta: torch.zeros_like(q),
              "own value only": lambda self, q, k, v, kv, layer, meta: v.clone()}[sabotage]
    monkeypatch.setattr(TorchAttention, "forward", broken)
    directory, _ = ckpt
    prompts = _prompts(seed=3)
    got = _engine_tokens(LLM(directory, block_size=7), prompts)
    want = hf_tokens(prompts, MAX_TOKENS)
    assert sum(g != w for g, w in zip(got, want)) >= len(prompts) // 2
