"""Property-based: random workloads (prompts, shared prefixes, sampling parameters, block sizes,
pool sizes, token budgets, chunked prefill and the prefix cache on or off) give every request
exactly what it gives alone: the reference model's own greedy generation, or for a seeded sampled
request, its solo run on a fresh engine. The trained tiny model, whose tokens depend on attention."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from course_lib.engine import LLM, SamplingParams
from course_lib.tiny import load_tiny

MODEL, _ = load_tiny()
V = MODEL.config.vocab_size


@st.composite
def workloads(draw):
    prefix = draw(st.lists(st.integers(0, V - 1), min_size=0, max_size=24))
    n = draw(st.integers(1, 5))
    requests = []
    for _ in range(n):
        own = draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=30))
        prompt = (prefix if draw(st.booleans()) else []) + own
        max_tokens = draw(st.integers(1, 8))
        if draw(st.integers(0, 3)) == 0:                          # now and then a seeded sampled request
            params = SamplingParams(max_tokens=max_tokens, temperature=draw(st.sampled_from([0.7, 1.0, 1.5])),
                                    top_k=draw(st.sampled_from([0, 5, 50])), top_p=draw(st.sampled_from([1.0, 0.9])),
                                    seed=draw(st.integers(0, 2**63)), ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        requests.append((prompt, params))
    block_size = draw(st.sampled_from([1, 3, 4, 16]))
    largest = max(-(-(len(p) + q.max_tokens) // block_size) for p, q in requests)
    options = dict(device="cpu", block_size=block_size,
                   num_kv_blocks=draw(st.integers(largest, 3 * largest + 2)),        # often small: preemption
                   max_num_batched_tokens=draw(st.integers(8, 64)),
                   max_num_seqs=draw(st.integers(1, 6)),
                   enable_prefix_caching=draw(st.booleans()))
    chunked = draw(st.booleans())
    if not chunked and max(len(p) + q.max_tokens for p, q in requests) <= options["max_num_batched_tokens"]:
        options["enable_chunked_prefill"] = False
    return requests, options


def solo(prompt, params):
    if params.greedy:
        return MODEL.generate(torch.tensor([prompt]), params.max_tokens)[0, len(prompt):].tolist()
    return LLM(MODEL, device="cpu").generate([prompt], params)[0].token_ids


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_any_workload_gives_every_request_its_solo_answer(workload):
    requests, options = workload
    llm = LLM(MODEL, **options)
    outs = llm.generate([p for p, _ in requests], [q for _, q in requests])
    for (prompt, params), out in zip(requests, outs):
        assert out.token_ids == solo(prompt, params), (options, len(prompt), params)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
