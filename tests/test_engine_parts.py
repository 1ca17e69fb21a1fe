"""The engine's parts one at a time: block manager, scheduler, KV pool, ledger, sampler, snapshots."""

import numpy as np
import pytest
import torch

from conftest import random_model
from course_lib.config import GPTConfig
from course_lib import perf
from course_lib.errors import InputError
from course_lib.engine import LLM, SamplingParams
from course_lib.engine.attention import gather_keys
from course_lib.engine.block_manager import BlockManager, hash_block
from course_lib.engine.kv_cache import PagedKVCache, kv_bytes_per_block
from course_lib.engine.metrics import step_cost
from course_lib.engine.scheduler import Scheduler
from course_lib.engine.sequence import Sequence, SequenceStatus

CFG = GPTConfig(vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=2)


def _seq(ids, max_tokens=4):
    return Sequence(list(ids), SamplingParams(max_tokens=max_tokens))


# ---------------------------------------------------------------- block manager
def test_blocks_cover_tokens_and_come_back():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = _seq(range(9))
    assert bm.allocate(s, 9)
    assert len(s.block_table) == 3 and 0 not in s.block_table      # block 0 is the null block
    assert bm.num_free_blocks == 7
    bm.free_sequence(s)
    assert bm.num_free_blocks == 10 and all(b.ref_count == 0 for b in bm.blocks)


def test_allocate_fails_without_change_when_pool_is_short():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = _seq(range(9))
    assert not bm.allocate(s, 9)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_only_full_blocks_are_hashed_and_shared():
    bm = BlockManager(num_blocks=20, block_size=4)
    a = _seq(range(10))                                            # 2 full blocks + 2 tokens
    bm.allocate(a, 10)
    assert a.block_hashes == []                                    # named once the step is issued
    bm.name_pending()
    assert len(a.block_hashes) == 2
    assert bm.blocks[a.block_table[2]].block_hash is None          # the partial block has no name
    assert a.block_hashes[1] == hash_block(hash_block(None, range(4)), range(4, 8))
    b = _seq(list(range(8)) + [50, 51, 52])
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_table[:2]
    assert bm.allocate(b, 3, hits)
    assert [bm.blocks[i].ref_count for i in hits] == [2, 2]
    # a prompt that is exactly the cached blocks still computes its last token
    c = _seq(range(8))
    assert bm.find_cached_prefix(c) == a.block_table[:1]
    # the same tokens after a different first block do not hit: the name covers the prefix
    d = _seq([99] * 4 + list(range(4, 8)) + [1])
    assert bm.find_cached_prefix(d) == []


def test_names_wait_for_the_launch_but_a_lookup_that_needs_them_finds_them():
    bm = BlockManager(num_blocks=30, block_size=4)
    bm.begin_step()
    a = _seq(range(12))
    assert bm.allocate(a, 12)
    other = _seq([50] * 9)                         # another first block: nothing of a can be a hit
    assert bm.find_cached_prefix(other) == [] and a.block_hashes == [] and bm.cached == {}
    assert bm.allocate(other, 9)
    b = _seq(list(range(8)) + [70, 71, 72])        # a's first two blocks, allocated in the same step
    assert bm.find_cached_prefix(b) == a.block_table[:2]
    assert len(a.block_hashes) == 3 and len(other.block_hashes) == 2   # the lookup named the waiting blocks
    # a sequence freed before its step is issued (preempted, aborted, a failed step) gets no names
    c = _seq([60] * 8 + [1])
    assert bm.allocate(c, 9)
    bm.free_sequence(c)
    bm.name_pending()
    assert bm.find_cached_prefix(_seq([60] * 8 + [2])) == []
    # a failed step's waiting names are forgotten too
    d = _seq([61] * 8 + [1])
    assert bm.allocate(d, 9)
    bm.forget_step_names()
    bm.name_pending()
    assert d.block_hashes == [] and bm.find_cached_prefix(_seq([61] * 8 + [2])) == []


def test_the_engine_names_a_steps_blocks_when_it_issues_the_step():
    """Right after step() has issued a prefill (its tokens not read yet), the prompt's full blocks
    are named: the naming runs beside the device, not at the next scheduling."""
    llm = LLM(random_model(CFG), block_size=4, num_kv_blocks=30)
    seq = llm.engine.add_request(list(range(1, 11)), SamplingParams(max_tokens=3, ignore_eos=True))
    llm.engine.step()
    bm = llm.engine.block_manager
    assert seq.num_output_tokens == 0 and seq.num_in_flight == 1        # issued, not learnt
    assert not bm.pending and len(seq.block_hashes) == 2
    assert all(bm.cached[h] == b for h, b in zip(seq.block_hashes, seq.block_table))
    while llm.engine.has_unfinished():
        llm.engine.step()


def test_freed_named_blocks_stay_findable_until_reused():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = _seq([1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    bm.name_pending()                                              # its step was issued
    bm.free_sequence(a)
    b = _seq([1, 2, 3, 4, 9])
    assert len(bm.find_cached_prefix(b)) == 2
    # fill the pool with other tokens: the named blocks are evicted, the name forgotten
    c = _seq([7] * 8)
    assert bm.allocate(c, 8)
    assert bm.find_cached_prefix(b) == []


# ---------------------------------------------------------------- scheduler
def _scheduler(num_blocks=100, budget=10, max_seqs=8, chunked=True, block_size=4):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, budget, max_seqs, chunked)


def _run_step(sched):
    out = sched.schedule()
    for s in out.scheduled:
        if s.needs_logits:
            s.seq.append_token(7, 0.0)
    sched.finish_step(out)
    return out


def test_one_budget_shared_by_decodes_and_prefill_chunks():
    sched = _scheduler(budget=10)
    a, b = _seq(range(1, 7), max_tokens=5), _seq(range(20, 35), max_tokens=5)
    sched.add(a), sched.add(b)
    out = _run_step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 6), (b, 4)]   # b gets a chunk
    out = _run_step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 9)]   # decode + chunk
    assert not out.scheduled[1].needs_logits
    out = _run_step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 2)]
    assert out.scheduled[1].needs_logits and b.num_output_tokens == 1


def test_chunked_prefill_off_admits_whole_prompts_only():
    sched = _scheduler(budget=10, chunked=False)
    a, b = _seq(range(1, 7)), _seq(range(20, 28))
    sched.add(a), sched.add(b)
    out = _run_step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 6)]
    out = _run_step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 8)]


def test_max_num_seqs_and_fcfs():
    sched = _scheduler(budget=100, max_seqs=2)
    seqs = [_seq([i + 1] * 3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out = _run_step(sched)
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert list(sched.waiting) == seqs[2:]


def test_preemption_takes_the_newest_and_requeues_it_first():
    sched = _scheduler(num_blocks=4, budget=100, block_size=4)
    a, b = _seq(range(1, 8), max_tokens=9), _seq(range(10, 17), max_tokens=9)
    sched.add(a), sched.add(b)
    _run_step(sched)                                  # both prefilled: 2 blocks each, pool full
    assert sched.block_manager.num_free_blocks == 0
    out = _run_step(sched)                            # a's 8th token needs... still in block 2
    out = _run_step(sched)                            # a needs a 3rd block: b (newest) is preempted
    assert out.preempted == [b] and b.status == SequenceStatus.WAITING
    assert b.num_computed_tokens == 0 and b.block_table == [] and sched.waiting[0] is b
    assert [s.seq for s in out.scheduled] == [a]
    while sched.has_unfinished():
        _run_step(sched)
    assert a.num_output_tokens == 9 and b.num_output_tokens == 9
    assert sched.block_manager.num_free_blocks == 4


# ---------------------------------------------------------------- KV pool
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_pool_bytes_formula_equals_allocation(dtype):
    kv = PagedKVCache(CFG, num_blocks=13, block_size=7, dtype=dtype)
    elem = 4 if dtype == torch.float32 else 2
    by_hand = 2 * CFG.n_layer * (13 + 1) * 7 * CFG.n_head * CFG.head_dim * elem
    assert kv.nbytes() == (13 + 1) * kv_bytes_per_block(CFG, 7, dtype) == by_hand
    assert kv.k[1].shape == (14, 7, CFG.n_head, CFG.head_dim)


def test_kv_write_then_gather_roundtrip():
    kv = PagedKVCache(CFG, num_blocks=5, block_size=3)
    k = torch.randn(4, CFG.n_head, CFG.head_dim)
    table = torch.tensor([4, 1, 3])                   # a request's blocks: positions 0-2, 3-5, 6-8
    slots = torch.tensor([12, 13, 3, 4])              # its positions 0, 1, 3, 4
    kv.write(1, k, -k, slots)
    keys, values = gather_keys(kv, 1, table, 5)       # positions 0..4
    assert torch.equal(keys[[0, 1, 3, 4]], k) and torch.equal(values[[0, 1, 3, 4]], -k)
    assert torch.equal(kv.k[1][4, 1], k[1])           # slot 13 = block 4, offset 1


# ---------------------------------------------------------------- ledger
def test_ledger_flops_and_bytes_equal_hand_counts():
    D, L, V, F = CFG.n_embd, CFG.n_layer, CFG.vocab_size, CFG.mlp_dim
    N = L * (D * 3 * D + 3 * D + D * D + D + D * F + F + F * D + D + 4 * D) + 2 * D   # + biases, norms
    W = L * (D * 3 * D + D * D + D * F + F * D)                                       # weight matrices
    assert perf.parameter_count(CFG) == N == random_model(CFG).num_params(non_embedding=True)
    # a step with a fresh 5-token prompt, a 3-token chunk after 4 cached tokens, a decode at context 10
    q, c = [5, 3, 1], [5, 7, 10]
    keys_seen = (1 + 2 + 3 + 4 + 5) + (5 + 6 + 7) + 10
    flops = 2 * W * 9 + 4 * L * D * keys_seen + 2 * D * V * 2
    assert step_cost(CFG, q, c, 2, 2) == (flops, 2 * (N + V * D + 2 * L * D * 22))
    assert step_cost(CFG, q, c, 0, 4)[1] == 4 * (N + 2 * L * D * 22)


def test_ledger_count_is_batch_cost_on_any_ragged_batch():
    """The ledger's per-step count (perf.batch_totals, from rates made once, Python ints for small
    batches and numpy past 64 requests, a shortcut when every request has one new token) gives
    batch_cost's totals, and the sums behind both are the hand count, on random ragged batches."""
    import numpy as np

    rng = np.random.default_rng(0)
    rates = perf.cost_rates(CFG, 2)
    for B in (1, 2, 7, 64, 65, 200):
        for decode_only in (True, False):
            q = np.ones(B, dtype=np.int64) if decode_only else rng.integers(1, 9, B)
            c = q + rng.integers(0, 40, B)
            for causal in (True, False):
                hand = sum(qi * (ci - qi) + qi * (qi + 1) // 2 if causal else qi * ci for qi, ci in zip(q, c))
                assert perf.ragged_sums(q, c, causal) == (q.sum(), hand, c.sum())
                assert perf.ragged_sums(q.tolist(), c.tolist(), causal) == (q.sum(), hand, c.sum())
            for rows in (0, B):
                cost = perf.batch_cost(CFG, q, c, rows, 2)
                assert perf.batch_totals(rates, q, c, rows) == step_cost(CFG, q, c, rows, 2) == (
                    int(cost.total_flops), cost.bytes["weights"] + cost.bytes["kv_read"])
    with pytest.raises(InputError, match="equally long"):
        perf.batch_totals(rates, [1, 2], [3], 1)


def test_engine_ledger_matches_formula_per_step():
    llm = LLM(random_model(CFG), block_size=4, max_num_batched_tokens=8, peak_flops=1e12, peak_bandwidth=1e11,
              snapshot=True)
    llm.generate([[1] * 11, [2] * 3], SamplingParams(max_tokens=3))
    recs = llm.ledger.records
    # step 0: 8 of the 11-token prompt (no logits); step 1: last 3 + the 3-token prompt, both sample
    assert [(r.num_prefill_tokens, r.num_decode_tokens, r.num_logit_rows) for r in recs[:3]] == [
        (8, 0, 0), (6, 0, 2), (0, 2, 2)]
    assert (recs[0].flops, recs[0].bytes) == step_cost(CFG, [8], [8], 0, 4)
    assert recs[1].flops == step_cost(CFG, [3, 3], [11, 3], 2, 4)[0]
    assert recs[2].bytes == step_cost(CFG, [1, 1], [12, 4], 2, 4)[1]
    for r in recs:
        assert r.mfu == pytest.approx(r.flops / r.seconds / 1e12)
        assert r.mbu == pytest.approx(r.bytes / r.seconds / 1e11)


def test_a_one_token_last_chunk_is_a_prefill_everywhere():
    """One definition of a decode: a single new token that was itself sampled. The last chunk of a
    prompt can be one token long; the ledger and the snapshots both call it a prefill."""
    llm = LLM(random_model(CFG), block_size=4, max_num_batched_tokens=4, snapshot=True)
    llm.generate([[3] * 5], SamplingParams(max_tokens=2, ignore_eos=True))     # chunks of 4 and 1
    first, last_chunk, decode = llm.snapshots[:3]
    assert [d["num_tokens"] for d in (first.scheduled[0], last_chunk.scheduled[0], decode.scheduled[0])] == [4, 1, 1]
    assert [s.scheduled[0]["kind"] for s in (first, last_chunk, decode)] == ["prefill", "prefill", "decode"]
    recs = llm.ledger.records
    assert [(r.num_prefill_tokens, r.num_decode_tokens) for r in recs[:3]] == [(4, 0), (1, 0), (0, 1)]


# ---------------------------------------------------------------- sampling, metrics, snapshots
def test_seeded_sampling_is_reproducible_and_batch_independent():
    model = random_model(CFG)
    p = SamplingParams(max_tokens=12, temperature=1.3, top_k=20, top_p=0.9, seed=123, ignore_eos=True)
    prompt = [3, 1, 4, 1, 5]
    alone = LLM(model, block_size=4).generate([prompt], p)[0].token_ids
    others = [SamplingParams(max_tokens=7, temperature=0.8, seed=s) for s in range(3)]
    batched = LLM(model, block_size=4).generate([[9, 9], prompt, [2] * 7, [5]], [others[0], p, others[1], others[2]])
    assert batched[1].token_ids == alone
    other_seed = SamplingParams(max_tokens=12, temperature=1.3, top_k=20, top_p=0.9, seed=124, ignore_eos=True)
    assert LLM(model, block_size=4).generate([prompt], other_seed)[0].token_ids != alone


def test_top_k_one_is_greedy_and_stop_tokens_stop():
    model = random_model(CFG)
    llm = LLM(model, block_size=4)
    greedy = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    top1 = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=2.0, top_k=1, seed=0,
                                                     ignore_eos=True))[0].token_ids
    assert top1 == greedy
    stop = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, stop_token_ids=[greedy[2]], ignore_eos=True))[0]
    assert stop.token_ids == greedy[:greedy.index(greedy[2]) + 1] and stop.finish_reason == "stop"


def test_eos_stops_unless_ignored():
    model = random_model(CFG)
    llm = LLM(model, block_size=4)
    ids = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    model.config.eos_token_id = ids[1]
    llm = LLM(model, block_size=4)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=6))[0]
    assert out.token_ids == ids[:ids.index(ids[1]) + 1] and out.finish_reason == "stop"
    model.config.eos_token_id = 0


def test_request_metrics_are_consistent():
    from course_lib.engine.metrics import throughput

    llm = LLM(random_model(CFG), block_size=4)
    out = llm.generate([[1, 2, 3], [4] * 9], SamplingParams(max_tokens=5, ignore_eos=True))
    tp = throughput(out)
    assert tp["output_tokens"] == 10 and tp["output_tokens_per_s"] == pytest.approx(10 / tp["seconds"])
    for o in out:
        m = o.metrics
        assert m.num_output_tokens == 5 and len(m.itl) == 4
        assert 0 < m.ttft <= m.latency
        assert m.tpot == pytest.approx(sum(m.itl) / 4)


def test_snapshots_record_decisions_and_are_off_by_default():
    model = random_model(CFG)
    assert LLM(model, block_size=4).snapshots is None
    llm = LLM(model, block_size=4, max_num_batched_tokens=6, snapshot=True)
    llm.generate([[1] * 9, [2] * 2], SamplingParams(max_tokens=2, ignore_eos=True))
    s0, s1 = llm.snapshots[:2]
    assert [(d["num_tokens"], d["kind"]) for d in s0.scheduled] == [(6, "prefill")]
    assert len(s0.slot_mapping) == 6 and s0.block_tables["%s" % s0.scheduled[0]["request_id"]]
    assert sum(d["num_tokens"] for d in s1.scheduled) <= 6
    table = s0.block_tables[s0.scheduled[0]["request_id"]]
    assert s0.slot_mapping == [table[t // 4] * 4 + t % 4 for t in range(6)]


def test_logprobs_top_k_and_chosen_token():
    model = random_model(CFG)
    llm = LLM(model, block_size=4)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 4
    logits = model(torch.tensor([[5, 6, 7]]))[0, -1]
    want = torch.log_softmax(logits, -1)
    first = out.logprobs[0]
    assert max(first, key=first.get) == out.token_ids[0] == int(want.argmax())
    for tok, lp in first.items():
        assert lp == pytest.approx(want[tok].item(), abs=1e-4)
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0].logprobs is None


def test_top_k_top_p_and_temperature_give_the_hand_computed_distribution():
    """The sampler's distribution, measured over many draws of one logits row, equals the one
    worked out by hand: temperature first, then the top-k cut, then the smallest nucleus whose
    mass reaches top_p, then renormalise. A reversed nucleus (keeping the tail) or a filter
    applied before the temperature would move mass to tokens that must never appear."""
    from course_lib.engine.sampler import sample

    logits = torch.log(torch.tensor([0.05, 0.40, 0.02, 0.25, 0.18, 0.10]))     # probabilities at T = 1
    # T = 0.5 squares the probabilities: 0.16, 0.0625, 0.0324, 0.01 (tokens 1, 3, 4, 5) are the top 4;
    # renormalised over them: 0.604, 0.236, 0.122, 0.038. The smallest nucleus with mass >= 0.8 is
    # tokens 1 and 3 (0.840): renormalised, 0.16 / 0.2225 and 0.0625 / 0.2225.
    want = torch.zeros(6)
    want[1], want[3] = 0.16 / 0.2225, 0.0625 / 0.2225
    params = SamplingParams(temperature=0.5, top_k=4, top_p=0.8)
    n = 6000
    seq = Sequence([0], params)
    seq.generator = torch.Generator().manual_seed(0)
    draws = torch.tensor(sample(logits.repeat(n, 1), [seq] * n).read()[0])
    freq = torch.bincount(draws, minlength=6).float() / n
    assert freq[[0, 2, 4, 5]].sum() == 0                    # outside the top-k or the nucleus: never
    assert torch.allclose(freq, want, atol=0.02), (freq, want)


def test_torch_attention_equals_an_explicit_softmax_on_a_mixed_step():
    """Decodes, a run of fresh equal prompts, a fresh prompt of its own length and a chunk after a
    cached prefix in one step: the batched SDPA path equals scores → mask → softmax → weights @ V
    written out per request."""
    from course_lib.engine.attention import TorchAttention
    from course_lib.engine.batch import build_flat_batch
    from course_lib.engine.scheduler import ScheduledSeq

    torch.manual_seed(0)
    H, Dh, bs = CFG.n_head, CFG.head_dim, 4
    kv = PagedKVCache(CFG, num_blocks=40, block_size=bs)
    kv.pool.normal_()
    rng = iter(range(1, 41))
    plan = [(9, 1), (4, 1), (5, 5), (5, 5), (3, 3), (12, 5), (7, 7)]        # (keys, new tokens) per request
    scheduled = []
    for keys, new in plan:
        s = _seq([1] * keys)
        s.block_table = [next(rng) for _ in range(-(-keys // bs))]
        scheduled.append(ScheduledSeq(s, new, keys - new))
    flat = build_flat_batch(scheduled, bs)
    N = flat.num_tokens
    q, k, v = (torch.randn(N, H, Dh) for _ in range(3))
    views = {n: torch.from_numpy(a) for n, a in {**flat.arrays(), "block_tables": flat.block_tables}.items()}
    kv.write(0, k, v, views["slot_mapping"])
    attn = TorchAttention()
    got = attn.forward(q, k, v, kv, 0, attn.metadata(flat, views, torch.float32, bs))
    for i, s in enumerate(flat.seqs):
        a, b = flat.query_start[i], flat.query_start[i + 1]
        S = int(flat.context_lens[i])
        keys, values = gather_keys(kv, 0, torch.tensor(s.seq.block_table), S)            # (S, H, Dh)
        scores = torch.einsum("nhd,shd->hns", q[a:b], keys) / Dh ** 0.5                 # (H, n, S)
        pos = torch.arange(S - (b - a), S)[:, None]
        weights = scores.masked_fill(torch.arange(S)[None, :] > pos, float("-inf")).softmax(-1)
        want = torch.einsum("hns,shd->nhd", weights, values)
        assert torch.allclose(got[a:b], want, atol=1e-5), f"request {i} ({plan[i]})"


def test_flat_batch_ids_from_prompt_arrays_and_output_lists():
    """A step's ids come from each prompt's array and each output list: random requests whose new
    tokens lie in the prompt (a prefill chunk), in the outputs (decode), across both (recomputed
    after preemption), with the last one still on the device; checked against the tokens one by one."""
    import random

    from course_lib.engine.batch import build_flat_batch
    from course_lib.engine.scheduler import ScheduledSeq

    rng = random.Random(0)
    for trial in range(200):
        scheduled = []
        for _ in range(rng.randint(1, 6)):
            prompt = [rng.randrange(100) for _ in range(rng.randint(1, 12))]
            s = _seq(prompt, max_tokens=20)
            s.token_ids += [rng.randrange(100) for _ in range(rng.randint(0, 6))]
            in_flight = bool(s.num_output_tokens) and rng.random() < 0.4
            if in_flight:
                s.num_in_flight, s.feed_row = 1, rng.randrange(8)
            total = s.num_tokens + in_flight
            start = rng.randrange(total)
            n = rng.randint(1, total - start)
            s.block_table = list(range(1, 1 + -(-(start + n) // 4)))
            scheduled.append(ScheduledSeq(s, n, start))
        flat = build_flat_batch(scheduled, 4)
        for i, q in enumerate(flat.seqs):
            a, b = flat.query_start[i], flat.query_start[i + 1]
            known = q.seq.token_ids[q.start:q.start + q.num_new_tokens]
            ids = known + [0] * (q.num_new_tokens - len(known))
            feeds = [0] * len(known) + [q.seq.feed_row + 1] * (q.num_new_tokens - len(known))
            assert flat.input_ids[a:b].tolist() == ids, (trial, i)
            assert flat.feed_rows[a:b].tolist() == feeds, (trial, i)
        assert flat.input_ids.flags.writeable and flat.input_ids.dtype == np.int64
