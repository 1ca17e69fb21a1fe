"""Decode bursts (EngineConfig.decode_burst): an all-decode greedy step with nobody waiting runs
several decode steps from one scheduling, each laid out from the one before on the host and fed
its ids on the device.

On CPU (the path is the same on a GPU, with each step a graph replay): greedy tokens equal
transformers' with chunked prefill, prefix hits and preemption in the same run; bursts really
happen, and only when allowed; the ledger, the blocks and the stops are exactly those of single
steps; streaming order is kept; a fault inside a burst leaves a state that finishes exactly.
"""

import pytest
import torch

from conftest import check_books, random_model, resume_exactly
from course_lib import checkpoint
from course_lib.config import GPTConfig
from course_lib.engine import LLM, EngineConfig, SamplingParams
from course_lib.engine.attention import TorchAttention
from course_lib.engine.batch import build_flat_batch, next_decode_batch
from course_lib.engine.scheduler import ScheduledSeq, Scheduler
from course_lib.errors import ConfigError
from course_lib.tiny import load_tiny

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=211, n_positions=64, n_embd=48, n_layer=2, n_head=3)
MODEL, TOK = load_tiny()
PROMPTS = [TOK.encode(t) for t in ("def f(x):", "The while statement", "import os\n", "class A:",
                                   "for i in range(", "x = [")]
MAX_TOKENS = [14, 9, 30, 7, 10, 16]
OPTIONS = dict(device="cpu", block_size=8, num_kv_blocks=40, max_num_batched_tokens=32, max_num_seqs=8)


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


@pytest.fixture
def bursts(monkeypatch):
    """The length of every burst the scheduler grants (1: a plain step)."""
    lengths, real = [], Scheduler.reserve_burst

    def reserve_burst(self, out, most):
        n = real(self, out, most)
        lengths.append(n)
        return n
    monkeypatch.setattr(Scheduler, "reserve_burst", reserve_burst)
    return lengths


def run(burst, prompts=PROMPTS, params=None, model=MODEL, **options):
    llm = LLM(model, **{**OPTIONS, **options}, decode_burst=burst)
    return llm, llm.generate(prompts, params or [greedy(n) for n in MAX_TOKENS])


# ---------------------------------------------------------------------- greedy parity
def test_greedy_tokens_equal_transformers_with_chunks_prefix_hits_preemption_and_bursts(tmp_path, bursts):
    model = random_model(GPTConfig(**CONFIG), seed=5)
    directory = checkpoint.save(model, tmp_path)
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, CONFIG["vocab_size"], (16,), generator=g).tolist()
    prompts = [shared + torch.randint(0, CONFIG["vocab_size"], (n,), generator=g).tolist() for n in (3, 9, 20, 5)]
    prompts += [torch.randint(0, CONFIG["vocab_size"], (n,), generator=g).tolist() for n in (30, 1, 7)]
    max_tokens = [19, 22, 16, 20, 18, 21, 17]
    llm, outs = run(4, prompts, [greedy(m) for m in max_tokens], model=model, num_kv_blocks=12,
                    max_num_batched_tokens=24, max_num_seqs=4)
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    for p, m, out in zip(prompts, max_tokens, outs):
        want = hf.generate(torch.tensor([p]), max_new_tokens=m, do_sample=False, pad_token_id=0)[0, len(p):]
        assert out.token_ids == want.tolist()
    eng = llm.engine
    assert max(bursts) == 4 and bursts.count(1) > 0                    # bursts and plain steps both ran
    assert eng.scheduler.num_preemptions > 0 and eng.block_manager.num_hit_tokens > 0
    assert eng.in_flight is None and not eng.has_unfinished()
    check_books(eng)


@pytest.mark.parametrize("async_on", [True, False])
def test_bursts_give_the_tokens_and_ledger_of_single_steps(bursts, async_on):
    """The same tokens; the ledger holds one record per decode step either way, with the same
    tokens, FLOPs and bytes (a burst never computes a token past any request's max_tokens); and
    far fewer schedulings."""
    (one, outs_one), (eight, outs_eight) = (run(b, async_scheduling=async_on) for b in (1, 8))
    assert [o.token_ids for o in outs_one] == [o.token_ids for o in outs_eight]
    fields = lambda llm: [(r.num_seqs, r.num_prefill_tokens, r.num_decode_tokens, r.flops, r.bytes)
                          for r in llm.ledger.records]
    assert fields(one) == fields(eight)
    assert one.engine.num_steps == eight.engine.num_steps == len(eight.ledger.records)
    schedulings = len(bursts) - len(fields(one))                        # the first run's were all 1
    assert bursts[:len(fields(one))] == [1] * len(fields(one))
    assert schedulings < len(fields(eight)) // 2 and max(bursts) == 8
    check_books(eight.engine)


def test_each_burst_step_is_the_batch_the_scheduler_would_lay_out():
    """next_decode_batch gives, array for array, what build_flat_batch makes of the same requests
    one token further (except the ids, which the device feeds), in the blocks the burst allocated."""
    eng = LLM(MODEL, **OPTIONS, decode_burst=1, async_scheduling=False).engine
    for p, n in zip(PROMPTS, MAX_TOKENS):
        eng.add_request(p, greedy(n))
    for _ in range(4):                                   # the prefill, then three decodes
        eng.step()
    sched = eng.scheduler.schedule()
    assert len(sched.scheduled) == len(PROMPTS) and all(s.is_decode for s in sched.scheduled)
    assert eng.scheduler.reserve_burst(sched, 3) == 3     # allocates the blocks of three steps
    flat = build_flat_batch(sched.scheduled, 8)
    nxt = next_decode_batch(flat, 8)
    for s in sched.scheduled:                            # the same requests after the plain step
        s.seq.token_ids.append(0)
        s.seq.num_computed_tokens = s.start + 1
    again = build_flat_batch([ScheduledSeq(s.seq, 1, s.start + 1) for s in sched.scheduled], 8)
    assert any((nxt.positions % 8 == 0))                 # some request crosses into a new block
    for name in ("positions", "slot_mapping", "query_start", "context_lens", "block_tables", "logits_indices"):
        assert (getattr(nxt, name) == getattr(again, name)).all(), name
    assert (nxt.feed_rows == nxt.logits_indices + 1).all() and not nxt.input_ids.any()
    assert nxt.tiles is flat.tiles                       # the tile table is shared, not rebuilt


# ---------------------------------------------------------------------- when a burst may run
def test_bursts_only_for_greedy_decodes_with_nobody_waiting(bursts):
    """A sampled request or one asking for log-probabilities keeps every step it shares plain;
    so does a waiting request (it must be admitted at the next step, not after a burst)."""
    params = [greedy(n) for n in MAX_TOKENS]
    params[1] = SamplingParams(max_tokens=9, temperature=0.8, seed=3)
    run(8, params=params)
    assert set(bursts[:9]) == {1}                        # request 1 runs through step 9: no burst with it
    bursts.clear()
    params[1] = greedy(9, logprobs=2)
    run(8, params=params)
    assert set(bursts[:9]) == {1}
    bursts.clear()
    run(8, max_num_seqs=2)                               # four requests wait while two decode
    assert max(bursts[:10]) == 1 and max(bursts) > 1     # bursts come once the queue is empty


def test_a_pool_without_room_for_the_burst_runs_plain_steps(bursts):
    """A burst of 8 needs up to a block more per request; with the pool that tight there is no
    burst at all, no preemption because of one, and the tokens are the same."""
    want = [o.token_ids for o in run(1, PROMPTS[:2], [greedy(16), greedy(16)])[1]]
    bursts.clear()
    need = sum(-(-(len(p) + 15) // 8) for p in PROMPTS[:2])             # blocks the two requests end with
    llm, outs = run(8, PROMPTS[:2], [greedy(16), greedy(16)], num_kv_blocks=need)
    assert [o.token_ids for o in outs] == want
    assert llm.engine.scheduler.num_preemptions == 0
    llm, outs = run(8, PROMPTS[:2], [greedy(16), greedy(16)], num_kv_blocks=need + 2)
    assert [o.token_ids for o in outs] == want and max(bursts) > 1


# ---------------------------------------------------------------------- exact stops
def test_stops_inside_a_burst_are_exact_and_later_tokens_are_discarded():
    _, free = run(1)
    params = []
    for i, o in enumerate(free):
        stop = o.token_ids[min(2 + i, len(o.token_ids) - 1)]
        params.append(SamplingParams(max_tokens=MAX_TOKENS[i], stop_token_ids=[stop], ignore_eos=True))
    params[5] = SamplingParams(max_tokens=MAX_TOKENS[5])                # end-of-text may come first
    (_, outs_one), (eight, outs_eight) = run(1, params=params), run(8, params=params)
    for i, (a, b) in enumerate(zip(outs_one, outs_eight)):
        assert (a.token_ids, a.finish_reason, a.metrics.num_output_tokens) == \
               (b.token_ids, b.finish_reason, b.metrics.num_output_tokens), i
        if i < 5:
            first = free[i].token_ids.index(params[i].stop_token_ids[0])
            assert b.token_ids == free[i].token_ids[:first + 1] and b.finish_reason == "stop"
    computed = lambda llm: sum(r.num_logit_rows for r in llm.ledger.records)
    emitted = sum(o.metrics.num_output_tokens for o in outs_eight)
    assert emitted < computed(eight) <= emitted + 5 * 8                  # a late stop wastes at most a burst
    check_books(eight.engine)
    assert eight.engine.in_flight is None


def test_streaming_order_is_unchanged():
    """Each request's events: its tokens in order, the last one marked finished, as with single steps."""
    events = {}
    for burst in (1, 8):
        llm = LLM(MODEL, **OPTIONS, decode_burst=burst)
        events[burst] = [(e.index, e.token_id, e.finished, e.finish_reason)
                         for e in llm.stream(PROMPTS, [greedy(n) for n in MAX_TOKENS])]
    for i in range(len(PROMPTS)):
        mine = {b: [e for e in events[b] if e[0] == i] for b in events}
        assert mine[1] == mine[8] and len(mine[8]) == MAX_TOKENS[i]
        assert mine[8][-1][2] and not any(e[2] for e in mine[8][:-1])


# ---------------------------------------------------------------------- faults
@pytest.mark.parametrize("kind", [KeyboardInterrupt, RuntimeError])
def test_a_fault_in_the_middle_of_a_burst_then_a_clean_finish(monkeypatch, bursts, kind):
    want = [o.token_ids for o in run(1)[1]]
    llm = LLM(MODEL, **OPTIONS, decode_burst=8)
    eng = llm.engine
    seqs = [eng.add_request(p, greedy(n)) for p, n in zip(PROMPTS, MAX_TOKENS)]
    real, calls, seen = TorchAttention.forward, [0], []

    def forward(self, *a):
        calls[0] += 1
        if bursts and bursts[-1] > 1 and not seen:
            seen.append(calls[0])
        if seen and calls[0] == seen[0] + 3 * MODEL.config.n_layer:    # the burst's 4th step
            raise kind("injected")
        return real(self, *a)
    monkeypatch.setattr(TorchAttention, "forward", forward)
    with pytest.raises(kind):
        while eng.has_unfinished():
            eng.step()
    assert seen and eng.in_flight is None
    assert all(s.num_in_flight == 0 and s.num_computed_tokens == 0 for s in seqs if not s.is_finished)
    resume_exactly(eng, seqs, want, monkeypatch)


# ---------------------------------------------------------------------- configuration
def test_decode_burst_is_validated_and_resolved():
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ConfigError, match="decode_burst must be a positive integer"):
            EngineConfig(decode_burst=bad)
    with pytest.raises(ConfigError, match="tensor_parallel_size > 1"):
        EngineConfig(decode_burst=4, tensor_parallel_size=2)
    cfg = MODEL.config
    assert EngineConfig(device="cpu").resolve(cfg).decode_burst == 1
    assert EngineConfig(device="cpu", decode_burst=6).resolve(cfg).decode_burst == 6
    assert LLM(MODEL, device="cpu", decode_burst=6, snapshot=True).engine.burst == 1   # snapshots: every step
