"""The OpenAI-compatible server (course_lib/engine/server.py), driven by the official ``openai`` client.

Every server here listens on 127.0.0.1 on a free port, runs in this process (ServerThread) or as
a ``python -m course_lib.engine serve`` subprocess, and is stopped by the test that started it.
Every wait is bounded. Reference outputs come from ``LLM.generate`` run alone, one prompt at a time.
"""

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from course_lib.engine import LLM, SamplingParams  # noqa: E402
from course_lib.engine.server import ServerThread, create_app  # noqa: E402
from course_lib.errors import CourseError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EOS = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def ref():
    """The reference: an LLM of its own, never touched by a server."""
    return LLM("tiny")


@pytest.fixture(scope="module")
def server():
    with ServerThread(create_app(LLM("tiny"), max_pending=256)) as s:
        yield s
    assert s.stopped


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60)


def solo(ref, prompt, **params):
    """LLM.generate alone on one prompt → (token ids, text as the server gives it, finish reason)."""
    out = ref.generate(prompt, SamplingParams(**params))[0]
    ids = out.token_ids
    text_ids = ids[:-1] if out.finish_reason == "stop" else ids      # no text for the end-of-text token
    return ids, ref.tokenizer.decode(text_ids), out.finish_reason


def metrics(url) -> dict:
    """{(name, labels): value} of the server's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(url, name, **labels) -> float:
    return metrics(url).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(condition, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def stream_ids(chunks):
    """(token ids, text, finish reason) of a stream of completion chunks with return_token_ids."""
    text, ids, reason = "", [], None
    for ch in chunks:
        for c in ch.choices:
            text += c.text
            ids += getattr(c, "token_ids", None) or []
            reason = c.finish_reason or reason
    return ids, text, reason


PROMPTS = ["def ", "The ", "import numpy as np\n", "class "]


# ---------------------------------------------------------------------------------------------- answers
def test_completion_equals_llm_generate(client, ref):
    for prompt in PROMPTS:
        ids, text, reason = solo(ref, prompt, max_tokens=24)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                      extra_body={"return_token_ids": True})
        (c,) = r.choices
        assert (c.token_ids, c.text, c.finish_reason) == (ids, text, reason)
        assert c.prompt_token_ids == ref.tokenizer.encode(prompt)
        assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(c.prompt_token_ids), len(ids))
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_equals_llm_generate(client, ref):
    for prompt in PROMPTS:
        ids, text, reason = solo(ref, prompt, max_tokens=24)
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"return_token_ids": True}))
        assert stream_ids(chunks) == (ids, text, reason)
        assert len([c for c in chunks if c.choices]) == len(ids)       # one chunk per token
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)


def test_eos_ends_with_stop_and_no_eos_text(client, ref):
    """A seeded sample of the tiny model that reaches its end-of-text token (greedy ones run on to
    the length limit); the server says "stop" and leaves the token's text out, as OpenAI-style
    servers do."""
    seed = next(sd for sd in range(50) if solo(ref, "The ", max_tokens=100, temperature=1.0, seed=sd)[2] == "stop")
    ids, text, reason = solo(ref, "The ", max_tokens=100, temperature=1.0, seed=seed)
    r = client.completions.create(model="tiny", prompt="The ", max_tokens=100, temperature=1.0, seed=seed,
                                  extra_body={"return_token_ids": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].token_ids == ids
    assert r.choices[0].token_ids[-1] == ref.config.eos_token_id and EOS not in r.choices[0].text
    assert r.choices[0].text == text


def test_token_id_prompts_and_lists_of_prompts(client, ref):
    ids_prompts = [ref.tokenizer.encode(p) for p in PROMPTS]
    expect = [solo(ref, p, max_tokens=10, ignore_eos=True) for p in ids_prompts]
    r = client.completions.create(model="tiny", prompt=ids_prompts, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    assert [c.index for c in r.choices] == list(range(len(PROMPTS)))
    assert [(c.token_ids, c.text, c.finish_reason) for c in r.choices] == expect
    r = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=10, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    per_choice = {}
    for chunk in r:
        per_choice.setdefault(chunk.choices[0].index, []).append(chunk)
    assert [stream_ids(per_choice[i]) for i in range(len(PROMPTS))] == expect
    one = client.completions.create(model="tiny", prompt=ids_prompts[0], max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert one.choices[0].text == expect[0][1]


def test_seeded_sampling_with_top_k_equals_llm_generate(client, ref):
    params = dict(max_tokens=20, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    ids, text, reason = solo(ref, "def ", **params)
    for _ in range(2):
        r = client.completions.create(model="tiny", prompt="def ", max_tokens=20, temperature=0.9, top_p=0.95,
                                      seed=1234, extra_body={"top_k": 40, "return_token_ids": True})
        assert (r.choices[0].token_ids, r.choices[0].text) == (ids, text)
    other = client.completions.create(model="tiny", prompt="def ", max_tokens=20, temperature=0.9, seed=99,
                                      extra_body={"return_token_ids": True})
    assert other.choices[0].token_ids != ids                 # the seed matters


def test_stop_strings_end_before_the_stop_string_and_free_blocks(client, server, ref):
    ids, text, _ = solo(ref, "def ", max_tokens=40, ignore_eos=True)
    toks = ref.tokenizer.tokens(ids)
    cut = len(toks[0]) + len(toks[1]) + len(toks[2]) - 1    # a stop string across the 3rd/4th tokens' border
    stop = text[cut:cut + 3]
    expect = text[:text.find(stop)]
    aborts = metric(server.url, "course_requests_total", finish_reason="abort")
    for stream in (False, True):
        steps = metric(server.url, "course_engine_steps_total")
        r = client.completions.create(model="tiny", prompt="def ", max_tokens=40, temperature=0, stop=[stop, "@@@"],
                                      stream=stream, extra_body={"ignore_eos": True, "return_token_ids": True})
        got_ids, got_text, reason = stream_ids(r) if stream else (
            r.choices[0].token_ids, r.choices[0].text, r.choices[0].finish_reason)
        assert (got_text, reason) == (expect, "stop")
        assert got_ids == ids[:len(got_ids)] and len(got_ids) < len(ids)
        wait_for(lambda: metric(server.url, "course_kv_blocks_in_use") == 0, what="blocks freed")
        # aborted in the engine: no step after the one that learnt the stop string's last token (with
        # asynchronous scheduling that call has already issued the next step: one more, its token discarded)
        assert metric(server.url, "course_engine_steps_total") - steps == len(got_ids) + ref.engine.lag
    assert metric(server.url, "course_requests_total", finish_reason="abort") == aborts   # counted as "stop"
    # a stop string that never appears changes nothing; a stop token id ends generation at that token
    r = client.completions.create(model="tiny", prompt="def ", max_tokens=40, temperature=0, stop="@@@",
                                  extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, "length")
    r = client.completions.create(model="tiny", prompt="def ", max_tokens=40, temperature=0,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [ids[5]], "return_token_ids": True})
    first = ids.index(ids[5])
    assert r.choices[0].token_ids == ids[:first + 1] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == ref.tokenizer.decode(ids[:first])


def test_stop_strings_inside_a_decode_burst_send_no_token_after_the_stop(client, ref):
    """An engine with decode bursts of 8 learns several tokens of a request at once; the server
    still ends the choice at the token that completes the stop string: the same text, token ids
    and usage as the server whose engine learns one token a step."""
    ids, text, _ = solo(ref, "def ", max_tokens=40, ignore_eos=True)
    toks = ref.tokenizer.tokens(ids)
    cut = sum(len(t) for t in toks[:5]) - 1                 # a stop string across the 5th/6th tokens' border
    stop = text[cut:cut + 3]
    want = None
    with ServerThread(create_app(LLM("tiny", decode_burst=8), max_pending=8)) as burst_server:
        burst = openai.OpenAI(base_url=burst_server.url + "/v1", api_key="-", max_retries=0, timeout=60)
        for c in (client, burst):
            for stream in (False, True):
                r = c.completions.create(model="tiny", prompt="def ", max_tokens=40, temperature=0, stop=stop,
                                         stream=stream, extra_body={"ignore_eos": True, "return_token_ids": True},
                                         **({"stream_options": {"include_usage": True}} if stream else {}))
                if stream:
                    chunks = list(r)
                    got = (*stream_ids(chunks), next(ch.usage for ch in chunks if ch.usage).completion_tokens)
                else:
                    got = (r.choices[0].token_ids, r.choices[0].text, r.choices[0].finish_reason,
                           r.usage.completion_tokens)
                want = want or got
                assert got == want and got[1] == text[:text.find(stop)] and got[2] == "stop"
                assert got[3] == len(got[0]) < len(ids) and got[0] == ids[:len(got[0])]
    assert len(want[0]) >= 5


def test_logprobs_equal_the_engines(client, ref):
    out = ref.generate("def ", SamplingParams(max_tokens=8, logprobs=3, ignore_eos=True))[0]
    r = client.completions.create(model="tiny", prompt="def ", max_tokens=8, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == ref.tokenizer.tokens(out.token_ids)
    assert lp.token_logprobs == pytest.approx([e[t] for e, t in zip(out.logprobs, out.token_ids)], abs=1e-5)
    for top, entry in zip(lp.top_logprobs, out.logprobs):
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:3]
        assert list(top) == [ref.tokenizer.decode([i]) for i, _ in best]
        assert list(top.values()) == pytest.approx([v for _, v in best], abs=1e-5)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    chunks = list(client.completions.create(model="tiny", prompt="def ", max_tokens=8, temperature=0, logprobs=3,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    h = httpx.get(server.url + "/health", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    before = metrics(server.url)
    client.completions.create(model="tiny", prompt="def ", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    after = metrics(server.url)
    grew = lambda name, **lb: after[(name, tuple(sorted(lb.items())))] - before.get(   # noqa: E731
        (name, tuple(sorted(lb.items()))), 0.0)
    assert grew("course_requests_total", finish_reason="length") == 1
    assert grew("course_generation_tokens_total") == 5 and grew("course_prompt_tokens_total") == 2
    assert grew("course_time_to_first_token_seconds_count") == 1
    assert grew("course_inter_token_latency_seconds_count") == 4
    assert after[("course_kv_blocks_in_use", ())] == 0 and after[("course_kv_blocks_total", ())] > 0
    assert ("course_preemptions_total", ()) in after


def test_small_responses_are_not_held_back_by_nagle(server):
    """With Nagle's algorithm on, a response written in two pieces waits for the client's delayed
    ACK (~40 ms on Linux); the server's sockets turn it off, so a keep-alive request takes ~1 ms."""
    with httpx.Client(timeout=10) as http:
        http.get(server.url + "/health")
        best = min(_timed(lambda: http.get(server.url + "/health")) for _ in range(5))
    assert best < 0.02, f"/health took {best * 1e3:.0f} ms at best"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- many clients
def test_100_concurrent_streams_each_get_their_own_tokens(server, ref):
    rng = random.Random(0)
    jobs = []
    for i in range(100):                      # distinct prompts; half greedy, half seeded sampling
        prompt = [rng.randrange(1, ref.config.vocab_size) for _ in range(rng.randint(2, 24))]
        sampled = dict(temperature=0.8, seed=i) if i % 2 else dict(temperature=0)
        jobs.append((prompt, dict(max_tokens=rng.randint(4, 8), ignore_eos=True, **sampled)))
    expect = [solo(ref, p, **kw) for p, kw in jobs]
    assert len({tuple(e[0]) for e in expect}) > 90                # outputs differ: a mix-up would show

    async def one(client, prompt, kw):
        stream = await client.completions.create(model="tiny", prompt=prompt, stream=True, **{
            k: kw[k] for k in ("max_tokens", "temperature") if k in kw}, seed=kw.get("seed"),
            extra_body={"ignore_eos": True, "return_token_ids": True})
        return stream_ids([chunk async for chunk in stream])

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60)
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p, kw) for p, kw in jobs)), 60)
        finally:
            await client.close()

    got = asyncio.run(main())
    assert got == expect
    wait_for(lambda: metric(server.url, "course_kv_blocks_in_use") == 0, what="blocks freed")


# ---------------------------------------------------------------------------------------------- disconnects
def test_client_disconnect_mid_stream_aborts_and_frees_blocks(server):
    aborts = metric(server.url, "course_requests_total", finish_reason="abort")
    body = {"model": "tiny", "prompt": "def ", "max_tokens": 120, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]                   # a few tokens, then hang up
            assert all(not line or line.startswith("data: {") for line in got)
            assert metric(server.url, "course_kv_blocks_in_use") > 0
    wait_for(lambda: metric(server.url, "course_requests_total", finish_reason="abort") == aborts + 1,
             what="the request aborted")
    wait_for(lambda: metric(server.url, "course_kv_blocks_in_use") == 0, what="blocks freed")
    assert metric(server.url, "course_requests_pending") == 0


def test_client_disconnect_while_waiting_for_a_whole_answer_aborts(server):
    aborts = metric(server.url, "course_requests_total", finish_reason="abort")
    body = json.dumps({"model": "tiny", "prompt": [[5 + i, 7] for i in range(16)], "max_tokens": 120,
                       "temperature": 0, "ignore_eos": True}).encode()
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    wait_for(lambda: metric(server.url, "course_kv_blocks_in_use") > 0, what="the request running")
    sock.close()
    wait_for(lambda: metric(server.url, "course_requests_total", finish_reason="abort") == aborts + 16,
             what="16 prompts aborted")
    wait_for(lambda: metric(server.url, "course_kv_blocks_in_use") == 0, what="blocks freed")


# ---------------------------------------------------------------------------------------------- bad requests
BAD = [   # (raw body or JSON object, status, words of the message, param)
    (b"{not json", 400, "not valid JSON", None),
    (b"[1, 2]", 400, "must be a JSON object", None),
    ({"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature"),
    ({"model": "tiny", "prompt": 5}, 400, "prompt must be", "prompt"),
    ({"model": "tiny", "prompt": [1.5, 2]}, 400, "prompt must be", "prompt"),
    ({"model": "tiny", "prompt": "x", "stop": 7}, 400, "stop must be", "stop"),
    ({"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "stream", "stream"),
    ({"model": "tiny", "prompt": "x", "bogus": 1}, 400, "Unrecognized request argument supplied: bogus", "bogus"),
    ({"prompt": "x"}, 400, "missing required field 'model'", "model"),
    ({"model": "tiny"}, 400, "missing required field 'prompt'", "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens must be a positive integer", "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature must be", "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "top_p must be in (0, 1]", "top_p"),
    ({"model": "tiny", "prompt": "x", "top_k": -2}, 400, "top_k must be", "top_k"),
    ({"model": "tiny", "prompt": "x", "seed": -1}, 400, "seed must be", "seed"),
    ({"model": "tiny", "prompt": "x", "logprobs": 21}, 400, "logprobs must be an integer in 0..20", "logprobs"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "only n=1", "n"),
    ({"model": "tiny", "prompt": "x", "echo": True}, 400, "echo is not supported", "echo"),
    ({"model": "tiny", "prompt": "x", "stop": [""]}, 400, "stop strings must not be empty", "stop"),
    ({"model": "tiny", "prompt": "x", "stop_token_ids": [5000]}, 400, "stop token id 5000 is out of range", "prompt"),
    ({"model": "tiny", "prompt": ""}, 400, "the prompt is empty", "prompt"),
    ({"model": "tiny", "prompt": []}, 400, "the prompt is empty", "prompt"),
    ({"model": "tiny", "prompt": [1, 5000]}, 400, "token id 5000 is out of range", "prompt"),
    ({"model": "tiny", "prompt": "caf\u00e9"}, 400, "not in this tokenizer's alphabet", "prompt"),
    ({"model": "tiny", "prompt": [1] * 200}, 400, "longer than the model's context", "prompt"),
    ({"model": "tiny", "prompt": "def ", "max_tokens": 500}, 400, "exceeds the context", "max_tokens"),
    ({"model": "tiny", "prompt": [[1, 2], [1, 99999]]}, 400, "prompt 1: token id 99999", "prompt"),
    ({"model": "tiny", "prompt": ["def ", [1, 2]]}, 400, "prompt must be", "prompt"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "The model 'gpt-4' does not exist", "model"),
]


@pytest.mark.parametrize("body,status,words,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_request_is_a_4xx_with_an_openai_error_body(server, body, status, words, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=content, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param and err["type"]
    assert "Traceback" not in r.text


def test_bad_requests_through_the_client_then_it_keeps_serving(client, server, ref):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=-3)
    assert "max_tokens must be a positive integer" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", extra_body={"top_k": "many"})
    r = httpx.get(server.url + "/v2/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    assert metric(server.url, "course_requests_pending") == 0
    ids, text, _ = solo(ref, "def ", max_tokens=6)
    assert client.completions.create(model="tiny", prompt="def ", max_tokens=6, temperature=0).choices[0].text == text


def test_a_failed_engine_step_is_a_500_and_the_server_goes_on(client, server, ref):
    runner = server.app.state.llm.engine.runner
    worker = server.app.state.worker
    real = runner.execute
    calls, later = [], {}

    def ask_later():
        later["text"] = client.completions.create(model="tiny", prompt="The ", max_tokens=5,
                                                  temperature=0).choices[0].text

    def failing_once(flat):
        calls.append(1)
        if len(calls) == 1:
            # a request that arrives while the step runs waits in the command queue; it was not in the
            # failed step, so it must be served, not failed with it
            later["thread"] = threading.Thread(target=ask_later)
            later["thread"].start()
            wait_for(lambda: worker._commands.qsize() > 0, what="the second request queued")
            raise RuntimeError("injected fault")
        return real(flat)

    runner.execute = failing_once
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="tiny", prompt="def ", max_tokens=6, temperature=0)
        assert "injected fault" in e.value.message
        later["thread"].join(30)
        assert later.get("text") == solo(ref, "The ", max_tokens=5)[1], "the queued request was failed with the step"
        chunks = client.completions.create(model="tiny", prompt="def ", max_tokens=6, temperature=0, stream=True)
        assert stream_ids(chunks)[1] == solo(ref, "def ", max_tokens=6)[1]
    finally:
        runner.execute = real
    assert metric(server.url, "course_kv_blocks_in_use") == 0


# ---------------------------------------------------------------------------------------------- overload, shutdown
def test_overload_answers_503_with_retry_after(ref):
    with ServerThread(create_app(LLM("tiny"), max_pending=2)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0, timeout=30)
        held = [client.completions.create(model="tiny", prompt="def ", max_tokens=120, temperature=0, stream=True,
                                          extra_body={"ignore_eos": True}) for _ in range(2)]
        for stream in held:
            next(iter(stream))                                        # both admitted and running
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="tiny", prompt="def ", max_tokens=4)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        assert e.value.body["code"] == "overloaded" if isinstance(e.value.body, dict) else True
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": ["a", "b", "c"]}, timeout=10)
        assert r.status_code == 400 and "at most 2" in r.json()["error"]["message"]
        for stream in held:
            stream.close()                                            # hang up: their places come back
        wait_for(lambda: metric(s.url, "course_requests_pending") == 0, what="places freed")
        r = client.completions.create(model="tiny", prompt="def ", max_tokens=4, temperature=0)
        assert r.choices[0].text == solo(ref, "def ", max_tokens=4)[1]
        assert metric(s.url, "course_requests_rejected_total", status="503") == 1


def test_graceful_shutdown_finishes_requests_in_flight(ref):
    s = ServerThread(create_app(LLM("tiny"))).start()
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0, timeout=60)
    prompts = ["def ", "The ", "class ", "import "]
    expect = [solo(ref, p, max_tokens=60, ignore_eos=True) for p in prompts]
    results, started = [None] * len(prompts), threading.Barrier(len(prompts) + 1, timeout=30)

    def run(i):
        stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=60, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True, "return_token_ids": True})
        it = iter(stream)
        first = next(it)
        started.wait()
        results[i] = stream_ids([first, *it])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    try:
        for t in threads:
            t.start()
        started.wait()                                                # every request has its first token
        stopper = threading.Thread(target=s.stop)
        stopper.start()
        wait_for(lambda: not _accepts(s.host, s.port), timeout=10, what="new connections refused")
        for t in threads:
            t.join(60)
        stopper.join(60)
    finally:
        if not s.stopped:
            s.stop()
    assert results == expect                                          # all tokens of every request
    assert s.stopped and not s.app.state.worker.alive


def _accepts(host, port) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- the command
def test_serve_command_serves_and_stops_gracefully_on_sigint(ref):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "course_lib.engine", "serve", "--model", "tiny", "--port", "0",
                             "--log-level", "warning", "--device", "cpu"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()                                  # "serving 'tiny' on http://127.0.0.1:PORT/v1"
        assert "serving 'tiny' on http://127.0.0.1:" in line, line + proc.stderr.read() if proc.poll() else line
        base = line.split(" on ")[1].split()[0]
        client = openai.OpenAI(base_url=base, api_key="-", max_retries=0, timeout=60)
        ids, text, _ = solo(ref, "def ", max_tokens=40, ignore_eos=True)
        stream = iter(client.completions.create(model="tiny", prompt="def ", max_tokens=40, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
        first = next(stream)
        proc.send_signal(signal.SIGINT)                               # Ctrl-C with a request in flight
        assert stream_ids([first, *stream])[1] == text                # finished in full
        assert proc.wait(30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_serve_freezes_the_start_up_heap_before_serving(monkeypatch):
    """The serving process hides what it built at start-up from the garbage collector's full passes
    (gc.freeze): without it the first full collection paused the engine for ~0.1 s."""
    import gc

    from course_lib.engine import server as server_module

    seen = {}

    class Server:
        def run(self, sockets):
            seen["frozen"] = gc.get_freeze_count()

    monkeypatch.setattr(server_module, "uvicorn_server", lambda *a, **k: Server())
    try:
        server_module.serve(LLM("tiny"), port=0)
    finally:
        gc.unfreeze()
    assert seen["frozen"] > 10_000, seen


def test_serve_command_bad_flags_are_one_line_errors(capsys):
    from course_lib.engine.__main__ import main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        for args, words in [(["--port", "99999"], "is not a port number"),
                            (["--max-pending", "0"], "positive integer"),
                            (["--log-level", "loud"], "invalid choice"),
                            (["--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1")]:
            try:
                rc = main(["serve", *args])
            except SystemExit as e:
                rc = e.code
            err = capsys.readouterr().err
            assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err
    finally:
        taken.close()


def test_create_app_refuses_a_bad_bound():
    with pytest.raises(CourseError, match="max_pending must be a positive integer"):
        create_app(object(), max_pending=0)


def test_bench_server_smoke_writes_results(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "benchmarks/bench_server.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = tmp_path.glob("*_server_*_smoke.json")
    data = json.loads(path.read_text())
    assert [run["concurrency"] for run in data["runs"]] == [1, 4]
    for run in data["runs"]:
        assert run["requests_per_s"] > 0 and run["output_tokens_per_s"] == pytest.approx(
            run["requests_per_s"] * data["settings"]["max_tokens"])
        assert run["ttft_p50_ms"] <= run["ttft_p90_ms"] <= run["ttft_p99_ms"]
        assert run["server_ttft_mean_ms"] > 0 and run["server_itl_mean_ms"] > 0
    assert path.with_suffix(".md").exists() and path.with_suffix(".png").exists()
    assert "| clients | requests |" in r.stdout
