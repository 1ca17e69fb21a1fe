"""Serving a workload through the engine and scrubbing through it: notebook 11's widget logic."""

import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402

from course_lib.engine import LLM, SamplingParams  # noqa: E402
from course_lib.errors import ConfigError, InputError  # noqa: E402
from course_lib.widgets import engine as we  # noqa: E402


def greedy(n):
    return SamplingParams(max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    llm = LLM("tiny", device="cpu", block_size=16, num_kv_blocks=40, snapshot=True)
    return llm.model, llm.tokenizer


@pytest.fixture(scope="module")
def record(tiny):
    model, tok = tiny
    llm = LLM(model, tokenizer=tok, device="cpu", block_size=16, num_kv_blocks=6, max_num_seqs=4,
              max_num_batched_tokens=32, snapshot=True)
    shared = tok.encode("You are a helpful assistant. Answer every question in one short line.")[:16]
    reqs = [we.Request(0, shared + tok.encode(" a list"), greedy(40), "A"),
            we.Request(2, shared + tok.encode(" a tuple"), greedy(40), "B"),
            we.Request(3, tok.encode("A dictionary maps keys to values. " * 2), greedy(12), "C")]
    return llm, reqs, we.record_serving(llm, reqs)


def test_record_serving_arrivals_outputs_and_times(tiny, record):
    model, tok = tiny
    llm, reqs, rec = record
    assert list(rec.labels.values()) == ["A", "B", "C"]
    first = {lab: min(i for i, s in enumerate(rec.snapshots) if any(d["request_id"] == rid for d in s.scheduled))
             for rid, lab in rec.labels.items()}
    assert first["A"] == 0 and first["B"] == 2 and first["C"] >= 3          # not before its arrival
    assert rec.arrivals[rec.rid("B")] == 2 and rec.snapshots[0].step == 0
    assert len(rec.records) == rec.n_steps == len(llm.snapshots)
    solo = LLM(model, tokenizer=tok, device="cpu")
    for r in reqs:
        assert rec.outputs[rec.rid(r.label)] == solo.generate([r.prompt_ids], r.params)[0].token_ids
    assert rec.max_lens[rec.rid("C")] == len(reqs[2].prompt_ids) + 11
    assert rec.ttft("A") > 0 and len(rec.itl("A")) == 39 and rec.seconds > 0
    assert any(s.prefix_hits for s in rec.snapshots) and any(s.preempted for s in rec.snapshots)
    with pytest.raises(InputError, match="no request labelled"):
        rec.rid("Z")


def test_record_serving_keeps_only_its_own_steps(record):
    llm, reqs, rec = record
    again = we.record_serving(llm, reqs[:1])
    assert again.snapshots[0].step == rec.snapshots[-1].step + 1
    assert again.arrivals[again.rid("A")] == again.snapshots[0].step
    assert len(again.records) == again.n_steps == len(again.outputs[again.rid("A")])


def test_record_serving_reads_the_given_clock(record):
    """Times come from ``clock``: a counting clock gives one tick per arrival and per returned step."""
    llm, reqs, _ = record
    ticks = iter(range(10_000))
    rec = we.record_serving(llm, reqs[:1], clock=lambda: next(ticks))
    t = rec.token_times[rec.rid("A")]
    assert rec.arrival_times[rec.rid("A")] == 0 and t == sorted(t) and all(isinstance(x, int) for x in t)
    assert rec.ttft("A") >= 1 and all(g >= 1 for g in rec.itl("A"))


def test_record_serving_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(ConfigError, match="snapshot=True"):
        we.record_serving(LLM(model, device="cpu"), [we.Request(0, [1, 2], greedy(2), "x")])
    llm = LLM(model, device="cpu", snapshot=True)
    with pytest.raises(InputError, match="at least one"):
        we.record_serving(llm, [])
    with pytest.raises(InputError, match="arrival must be"):
        we.record_serving(llm, [we.Request(-1, [1, 2], greedy(2), "x")])


def test_block_explorer_moves_with_the_slider(record):
    _, _, rec = record
    w = we.build_block_widget(rec)
    assert w.message is None and w.summary.startswith("step 0: ")
    png0, text0 = w.image.value, w.summary
    w.step.value = rec.n_steps - 3
    assert w.message is None and w.summary.startswith(f"step {rec.n_steps - 3}: ")
    assert w.image.value != png0 and w.summary != text0 and w.step.max == rec.n_steps - 1


def test_chunked_prefill_runs_and_budget_widget(tiny):
    model, tok = tiny
    make = lambda b: LLM(model, device="cpu", max_num_batched_tokens=b, num_kv_blocks=40, snapshot=True)  # noqa: E731
    decoders = [we.Request(0, [5, 6, 7], greedy(10), f"d{i}") for i in range(2)]
    long_prompt = we.Request(2, list(range(10, 70)), greedy(2), "long")
    runs = we.chunked_prefill_runs(make, decoders, long_prompt, [16, 64], repeats=1)
    assert runs[16]["prefill_steps"] == 5 and runs[64]["prefill_steps"] == 1    # 60 tokens: 14 a step, then all
    assert runs[16]["max_step_tokens"] == 16 and runs[64]["max_step_tokens"] == 62
    assert runs[16]["outputs"] == runs[64]["outputs"]
    assert runs[16]["ttft"] > 0 and runs[16]["itl"] > 0
    assert we.window_itl(runs[64]["record"], ["d0", "d1"], "long")
    assert we.budget_summary(runs, 16).startswith("budget 16 tokens/step: the long prompt is prefilled over 5 step(s)")
    w = we.BudgetExplorer(runs)
    png = w.image.value
    w.budget.value = 64
    assert w.message is None and w.summary.startswith("budget 64") and w.image.value != png
    with pytest.raises(InputError, match="was not measured"):
        we.draw_budget_view(runs, 32)
    with pytest.raises(InputError, match="at least one token budget"):
        we.chunked_prefill_runs(make, decoders, long_prompt, [])
    with pytest.raises(InputError, match="repeats"):
        we.chunked_prefill_runs(make, decoders, long_prompt, [16], repeats=0)


def test_static_batching_counts_idle_slots(tiny):
    model, tok = tiny
    llm = LLM(model, device="cpu", snapshot=True)
    prompts = [[3, 4], [5, 6, 7], [8], [9, 10]]
    lens = [6, 2, 3, 5]
    run = we.static_batching(llm, prompts, [greedy(n) for n in lens], group_size=2)
    assert len(run.snapshots) == 6 + 5 and run.slots == [2] * 11
    assert run.idle_slots() == (6 - 2) + (5 - 3)
    assert [o.token_ids for o in run.outputs] == [o.token_ids for o in llm.generate(prompts, [greedy(n) for n in lens])]
    assert run.latencies[2] > run.latencies[0] * 0.5 and run.seconds >= max(run.latencies) * 0.99
    with pytest.raises(InputError, match="group_size"):
        we.static_batching(llm, prompts, [greedy(1)] * 4, 0)
    with pytest.raises(InputError, match="give one each"):
        we.static_batching(llm, prompts, [greedy(1)], 2)
    with pytest.raises(ConfigError, match="snapshot=True"):
        we.static_batching(LLM(model, device="cpu"), prompts, [greedy(1)] * 4, 2)
