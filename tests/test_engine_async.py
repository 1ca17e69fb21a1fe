"""Asynchronous scheduling (EngineConfig.async_scheduling): the host reads a step's tokens one call
later, after it has issued the next step, whose decode rows take those tokens on the device.

Everything the synchronous engine guarantees still holds, on CPU: greedy tokens equal transformers'
(with chunked prefill, prefix-cache hits and preemption in the same run), stops are exact (no token
past a stop token or max_tokens, usage counts right), seeded sampling draws the same tokens,
streaming order is unchanged, an abort with a token in flight frees its blocks, and a fault in the
forward while a step is in flight leaves a state that finishes exactly.
"""

import sys
from pathlib import Path

import pytest
import torch

from conftest import check_books, random_model, resume_exactly
from course_lib import checkpoint
from course_lib.config import GPTConfig
from course_lib.engine import LLM, EngineConfig, SamplingParams
from course_lib.engine.attention import TorchAttention
from course_lib.engine.runner import ModelRunner
from course_lib.engine.sampler import HostSample
from course_lib.errors import ConfigError
from course_lib.tiny import load_tiny

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=211, n_positions=64, n_embd=48, n_layer=2, n_head=3)
MODEL, TOK = load_tiny()
SYSTEM = TOK.encode("You are a helpful assistant. Answer every question in one short line of Python")[:32]
PROMPTS = [SYSTEM + TOK.encode(t) for t in (" What does a list do?", " How does a for loop end?")]
PROMPTS += [TOK.encode(t) for t in ("def f(x):", "The while statement", "import os\n", "class A:")]
MAX_TOKENS = [14, 9, 12, 7, 10, 16]
# a small pool (preemption), a small budget (chunked prefill), a shared system prompt (prefix hits)
OPTIONS = dict(device="cpu", block_size=8, num_kv_blocks=14, max_num_batched_tokens=32, max_num_seqs=4)


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


def run(async_on, prompts=PROMPTS, params=None, model=MODEL, **options):
    llm = LLM(model, **{**OPTIONS, **options}, async_scheduling=async_on, snapshot=True)
    outs = llm.generate(prompts, params or [greedy(n) for n in MAX_TOKENS])
    return llm, outs


# ---------------------------------------------------------------------- greedy parity
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = random_model(GPTConfig(**CONFIG), seed=5)
    return checkpoint.save(model, tmp_path_factory.mktemp("async_ckpt")), model


def test_greedy_tokens_equal_transformers_with_chunks_prefix_hits_and_preemption(ckpt):
    directory, model = ckpt
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, CONFIG["vocab_size"], (16,), generator=g).tolist()
    prompts = [shared + torch.randint(0, CONFIG["vocab_size"], (n,), generator=g).tolist() for n in (3, 9, 20, 5)]
    prompts += [torch.randint(0, CONFIG["vocab_size"], (n,), generator=g).tolist() for n in (30, 1, 7)]
    max_tokens = [9, 12, 6, 10, 8, 11, 7]
    llm, outs = run(True, prompts, [greedy(m) for m in max_tokens], model=model, num_kv_blocks=10,
                    max_num_batched_tokens=24)
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    for p, m, out in zip(prompts, max_tokens, outs):
        ids = torch.tensor([p])
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=m,
                               min_new_tokens=m, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert out.token_ids == want
        assert out.metrics.num_output_tokens == m and out.finish_reason == "length"
    assert llm.engine.lag == 1
    assert llm.engine.scheduler.num_preemptions > 0                         # the pool ran dry
    assert llm.engine.block_manager.num_hit_tokens > 0                      # the shared prefix was reused
    assert any(d["kind"] == "prefill" and d["num_tokens"] < len(prompts[4])
               for s in llm.snapshots for d in s.scheduled)                  # the 30-token prompt in chunks
    check_books(llm.engine)


def test_async_on_and_off_give_the_same_tokens_steps_and_snapshots():
    """The same schedule step for step (a request reaching max_tokens is never scheduled again:
    no wasted step), the same tokens, and the snapshots record the same thing: the fed decode ids,
    sampled tokens and finishes of every step, once the host has read them."""
    (on, outs_on), (off, outs_off) = run(True, num_kv_blocks=10), run(False, num_kv_blocks=10)
    assert [o.token_ids for o in outs_on] == [o.token_ids for o in outs_off]
    assert len(on.snapshots) == len(off.snapshots) == len(on.ledger.records)
    # (not the slot mapping: which free block comes first may differ after a preemption, since a block
    # whose last token was still in flight when its request was preempted had no prefix-cache name yet)
    def record(snap, outs):                      # request ids differ between engines: name them by index
        i = {o.request_id: k for k, o in enumerate(outs)}
        return ([(i[d["request_id"]], d["num_tokens"], d["start"], d["kind"]) for d in snap.scheduled],
                snap.input_ids, snap.positions, {i[r]: t for r, t in snap.sampled.items()},
                sorted(i[r] for r in snap.finished), [i[r] for r in snap.preempted],
                {i[r]: n for r, n in snap.prefix_hits.items()})
    for a, b in zip(on.snapshots, off.snapshots):
        assert record(a, outs_on) == record(b, outs_off), a.step
    assert on.engine.scheduler.num_preemptions > 0 and on.engine.block_manager.num_hit_tokens > 0
    assert on.engine.in_flight is None and not on.engine.has_unfinished()
    check_books(on.engine)


# ---------------------------------------------------------------------- exact stops
def test_stop_tokens_and_eos_are_exact_and_their_extra_token_is_discarded():
    """Each request stops at a token it really samples: the greedy run's 4th, 5th, ... token as a
    stop token; the last request with end-of-text on. The output ends at the stop, usage counts it,
    on equals off, and the tokens computed for stopped requests are never emitted."""
    _, free = run(False)
    params = []
    for i, o in enumerate(free):
        at = min(3 + i, len(o.token_ids) - 1)
        stop = o.token_ids[at]
        params.append(SamplingParams(max_tokens=MAX_TOKENS[i], stop_token_ids=[stop], ignore_eos=True))
    params[5] = SamplingParams(max_tokens=MAX_TOKENS[5])                    # end-of-text may come first
    results = {a: run(a, params=params) for a in (True, False)}
    (on, outs_on), (off, outs_off) = results[True], results[False]
    for i, (a, b) in enumerate(zip(outs_on, outs_off)):
        assert (a.token_ids, a.finish_reason, a.metrics.num_output_tokens) == \
               (b.token_ids, b.finish_reason, b.metrics.num_output_tokens), i
        if i < 5:
            first = free[i].token_ids.index(params[i].stop_token_ids[0])
            assert a.token_ids == free[i].token_ids[:first + 1] and a.finish_reason == "stop"
    stopped = sum(o.finish_reason == "stop" for o in outs_on)
    assert stopped >= 5
    computed = lambda llm: sum(r.num_logit_rows for r in llm.ledger.records)
    emitted = sum(o.metrics.num_output_tokens for o in outs_on)
    assert computed(off) == emitted                                         # no lag: nothing extra
    assert emitted < computed(on) <= emitted + stopped                      # at most one per late stop
    check_books(on.engine)
    assert on.engine.in_flight is None                                      # drained once idle


def test_step_returns_the_tokens_learnt_in_that_call():
    """With a lag of 1 the first call issues the prefill and returns nothing; each later call
    returns the previous step's token; has_unfinished counts the step in flight."""
    llm = LLM(MODEL, **OPTIONS)
    eng = llm.engine
    seq = eng.add_request(PROMPTS[2], greedy(3))
    assert eng.step() == []
    assert seq.num_in_flight == 1 and seq.num_output_tokens == 0
    got = [eng.step(), eng.step()]
    assert [[t for _, t in g] for g in got] == [[seq.output_token_ids[0]], [seq.output_token_ids[1]]]
    assert seq in eng.scheduler.finishing and eng.has_unfinished()          # its last token in flight
    last = eng.step()                                                       # issues nothing, learns it
    assert last == [(seq, seq.output_token_ids[2])] and seq.finish_reason == "length"
    assert not eng.has_unfinished() and eng.in_flight is None and eng.num_steps == 3


# ---------------------------------------------------------------------- sampling, streaming, abort
def test_seeded_sampling_draws_the_same_tokens():
    params = [SamplingParams(max_tokens=n, temperature=0.9, top_p=0.9, top_k=50, seed=7 + n, logprobs=2)
              for n in MAX_TOKENS]
    (_, on), (_, off) = run(True, params=params), run(False, params=params)
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert [o.finish_reason for o in on] == [o.finish_reason for o in off]
    for a, b in zip(on, off):
        assert len(a.logprobs) == len(a.token_ids)
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-5 for k in x)


def test_streaming_order_is_unchanged():
    """Length stops only: the very same event sequence on and off. With a stop token, learnt a
    step late, the interleaving across requests may shift (the schedule does), each request's own
    events not: its tokens in order, the last one marked finished."""
    stop = run(False)[1][1].token_ids[4]
    with_stop = [greedy(n) for n in MAX_TOKENS]
    with_stop[1] = SamplingParams(max_tokens=9, stop_token_ids=[stop], ignore_eos=True)
    for params in ([greedy(n) for n in MAX_TOKENS], with_stop):
        events = {}
        for a in (True, False):
            llm = LLM(MODEL, **OPTIONS, async_scheduling=a)
            events[a] = [(e.index, e.token_id, e.finished, e.finish_reason) for e in llm.stream(PROMPTS, params)]
        if params is not with_stop:
            assert events[True] == events[False]
        for i in range(len(PROMPTS)):
            mine = {a: [e for e in events[a] if e[0] == i] for a in events}
            assert mine[True] == mine[False]
            assert mine[True][-1][2] and not any(e[2] for e in mine[True][:-1])
    assert [e for e in events[True] if e[0] == 1][-1][1:] == (stop, True, "stop")


def test_abort_of_a_request_with_a_token_in_flight_frees_its_blocks():
    llm = LLM(MODEL, **OPTIONS)
    eng = llm.engine
    a, b = eng.add_request(PROMPTS[2], greedy(12)), eng.add_request(PROMPTS[3], greedy(7))
    for _ in range(3):
        eng.step()
    assert a.num_in_flight == 1 and a.block_table
    n = a.num_output_tokens
    eng.abort(a)
    assert a.block_table == [] and a.finish_reason == "abort"
    check_books(eng)
    while eng.has_unfinished():
        eng.step()
    assert a.num_output_tokens == n                                         # its in-flight token was dropped
    assert b.output_token_ids == run(False, [PROMPTS[3]], [greedy(7)])[1][0].token_ids
    eng.abort(b)                                                            # finished: nothing changes
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks and eng.in_flight is None


def test_the_host_issues_the_next_step_before_reading_the_tokens():
    """The order of events in one call: step n+1's forward, then the read of step n's tokens."""
    order = []
    llm = LLM(MODEL, **OPTIONS)
    real_execute, real_read = ModelRunner.execute, HostSample.read

    def execute(self, flat):
        order.append("forward")
        return real_execute(self, flat)

    def read(self):
        order.append("read")
        return real_read(self)
    ModelRunner.execute, HostSample.read = execute, read
    try:
        llm.generate(PROMPTS[2:4], [greedy(4), greedy(4)])
    finally:
        ModelRunner.execute, HostSample.read = real_execute, real_read
    assert order == ["forward"] + ["forward", "read"] * 3 + ["read"]


# ---------------------------------------------------------------------- faults
@pytest.mark.parametrize("kind", [KeyboardInterrupt, RuntimeError])
def test_a_fault_in_the_forward_while_a_step_is_in_flight_then_a_clean_finish(monkeypatch, kind):
    want = [o.token_ids for o in run(True)[1]]
    llm = LLM(MODEL, **OPTIONS)
    eng = llm.engine
    seqs = [eng.add_request(p, greedy(n)) for p, n in zip(PROMPTS, MAX_TOKENS)]
    real, calls, in_flight = TorchAttention.forward, [0], []

    def forward(self, *a):
        calls[0] += 1
        if calls[0] == 2 * MODEL.config.n_layer + 1:                        # the 3rd step's first layer
            in_flight.append(eng.in_flight is not None)
            raise kind("injected")
        return real(self, *a)
    monkeypatch.setattr(TorchAttention, "forward", forward)
    with pytest.raises(kind):
        while eng.has_unfinished():
            eng.step()
    assert in_flight == [True] and eng.in_flight is None                    # the step before was learnt
    assert all(s.num_in_flight == 0 for s in seqs)
    resume_exactly(eng, seqs, want, monkeypatch)


# ---------------------------------------------------------------------- configuration
def test_async_scheduling_is_validated_and_resolved():
    with pytest.raises(ConfigError, match="async_scheduling must be True or False"):
        EngineConfig(async_scheduling="yes")
    with pytest.raises(ConfigError, match="tensor_parallel_size > 1"):
        EngineConfig(async_scheduling=True, tensor_parallel_size=2)
    cfg = MODEL.config
    assert EngineConfig(device="cpu").resolve(cfg).async_scheduling is True
    assert EngineConfig(device="cpu", async_scheduling=False).resolve(cfg).async_scheduling is False
    assert EngineConfig(device="cpu", tensor_parallel_size=2).resolve(cfg).async_scheduling is False


def test_the_gpu_benchmark_script_runs_a_shape_on_cpu():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_async import run_shape

    r = run_shape(MODEL, torch.device("cpu"), batch=2, prompt_len=8, new=4, repeats=1)
    assert r["tokens_equal"] and r["on"]["steps"] == r["off"]["steps"] == 4
