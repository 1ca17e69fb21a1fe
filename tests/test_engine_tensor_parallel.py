"""The engine's tensor-parallel mode on CPU (gloo), two ranks, the shipped tiny model.

Greedy and seeded tokens equal one rank's on a workload with chunked prefill, prefix-cache hits
and preemption; bad sizes are clear errors; the worker processes end on shutdown, on garbage
collection, when rank 0 dies, and after a failure, which rank 0 reports within seconds. Each
engine start spawns a process that imports torch (seconds), so one pair of engines serves the
module and only the tests that break or stop an engine make their own.
"""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import random_model
from course_lib.config import GPTConfig
from course_lib.engine import LLM, SamplingParams
from course_lib.engine.config import check_tensor_parallel
from course_lib.engine.tensor_parallel import TensorParallelError, shard_state
from course_lib.errors import ConfigError

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
# small pool and budget: long prompts are chunked, requests are preempted
OPTIONS = dict(device="cpu", block_size=8, num_kv_blocks=24, max_num_batched_tokens=32, max_num_seqs=6)
LENS = [5, 17, 40, 63, 80, 9, 30, 50, 1, 71]
MAX_TOKENS = [30, 12, 40, 20, 35, 25, 8, 30, 16, 40]


def _prompts(seed, lens=LENS, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(1, 1024, (n,), generator=g).tolist() for n in lens]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids, seconds=15.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.fixture(scope="module")
def pair():
    one = LLM("tiny", **OPTIONS)
    two = LLM("tiny", tensor_parallel_size=2, **OPTIONS)
    yield one, two
    two.shutdown()


# ---------------------------------------------------------------------------------- same tokens
def test_greedy_tokens_equal_one_rank_with_chunks_prefix_hits_and_preemption(pair):
    one, two = pair
    shared = _prompts(1, lens=[40])[0]
    rounds = [_prompts(2), _prompts(3, lens=[3, 20, 33, 7], prefix=shared), _prompts(4, lens=[11, 2], prefix=shared)]
    for prompts in rounds:
        params = [SamplingParams(max_tokens=m, ignore_eos=True, logprobs=3) for m in MAX_TOKENS[:len(prompts)]]
        a, b = one.generate(prompts, params), two.generate(prompts, params)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        for x, y in zip(a, b):      # the logits themselves agree to fp32 rounding (sums in another order)
            for lx, ly in zip(x.logprobs, y.logprobs):
                assert lx.keys() == ly.keys() and max(abs(lx[k] - ly[k]) for k in lx) < 1e-4
    e = two.engine
    assert e.scheduler.num_preemptions > 0 and e.block_manager.num_hit_tokens > 0
    assert any(r.num_prefill_tokens and r.num_decode_tokens for r in e.ledger.records)   # mixed steps
    assert max(r.num_prefill_tokens for r in e.ledger.records) == OPTIONS["max_num_batched_tokens"]  # chunks
    assert e.block_manager.num_free_blocks == e.num_kv_blocks                  # everything given back


def test_seeded_sampling_and_streaming_equal_one_rank(pair):
    one, two = pair
    prompts = _prompts(5, lens=[6, 25, 44])
    params = [SamplingParams(max_tokens=20, temperature=0.9, top_k=40, top_p=0.95, seed=s, ignore_eos=True)
              for s in (1, 2, 3)]
    assert [o.token_ids for o in one.generate(prompts, params)] == [o.token_ids for o in two.generate(prompts, params)]
    text = "".join(ev.text for ev in two.stream("def ", SamplingParams(max_tokens=15, ignore_eos=True)))
    assert text == one.generate("def ", SamplingParams(max_tokens=15, ignore_eos=True))[0].text


def test_each_rank_holds_half_the_heads_and_half_the_kv_pool(pair):
    one, two = pair
    assert two.engine.kv_cache.num_heads == 2 and one.engine.kv_cache.num_heads == 4
    assert two.engine.kv_cache.nbytes() * 2 == one.engine.kv_cache.nbytes()
    w = two.engine.runner.model.transformer.h[0]
    assert w.attn.c_attn.weight.shape == (128, 3 * 64) and w.mlp.c_proj.weight.shape == (256, 128)


@pytest.mark.parametrize("world", [2, 4])
def test_shards_put_back_together_are_the_model(world):
    """Columns of q, k, v and c_fc, rows of both c_proj, row-split biases on rank 0 only."""
    model = random_model(GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=48))
    full = model.state_dict()
    shards = [shard_state(model, r, world) for r in range(world)]
    for name, p in full.items():
        if name == "lm_head.weight":
            continue
        parts = [s[name] for s in shards]
        if name.endswith("attn.c_attn.weight"):
            joined = torch.cat([t.view(32, 3, -1) for t in parts], dim=2).view(32, 96)
        elif name.endswith("attn.c_attn.bias"):
            joined = torch.cat([t.view(3, -1) for t in parts], dim=1).view(96)
        elif name.endswith("mlp.c_fc.weight") or name.endswith("mlp.c_fc.bias"):
            joined = torch.cat(parts, dim=-1)
        elif name.endswith("c_proj.weight"):
            joined = torch.cat(parts, dim=0)
        elif name.endswith("c_proj.bias"):
            joined = sum(parts)
            assert all(not t.any() for t in parts[1:])
        else:
            assert all(torch.equal(t, p) for t in parts), name                  # replicated
            continue
        assert torch.equal(joined, p), name


# ---------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("size,match", [(3, "must divide the model's 4 heads"), (0, "positive integer"),
                                        (-2, "positive integer"), (True, "positive integer"),
                                        (2.0, "positive integer"), (8, "must divide the model's 4 heads")])
def test_bad_sizes_are_clear_errors(size, match):
    with pytest.raises(ConfigError, match=match):
        LLM("tiny", device="cpu", tensor_parallel_size=size)


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    cfg = GPTConfig(n_head=4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="needs 2 CUDA GPUs .* but 1 are visible"):
        check_tensor_parallel(2, cfg, torch.device("cuda"))
    with pytest.raises(ConfigError, match="device='cuda'"):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
        check_tensor_parallel(2, cfg, torch.device("cuda", 1))
    check_tensor_parallel(4, cfg, torch.device("cpu"))                   # any size on CPU that divides


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_more_ranks_than_gpus_on_this_machine():
    size = next(n for n in (2, 4, 8, 16, 32) if n > torch.cuda.device_count())
    model = random_model(GPTConfig(vocab_size=50, n_positions=16, n_embd=64, n_layer=1, n_head=32))
    with pytest.raises(ConfigError, match=f"needs {size} CUDA GPUs"):
        LLM(model, device="cuda", tensor_parallel_size=size)


# ---------------------------------------------------------------------------------- stopping
def test_shutdown_and_garbage_collection_end_the_workers():
    llm = LLM("tiny", device="cpu", tensor_parallel_size=2)
    pids = llm.engine.tp.pids
    assert all(_alive(p) for p in pids)
    llm.shutdown()
    assert _wait_gone(pids) == []
    llm.shutdown()                                                       # twice is fine
    with pytest.raises(TensorParallelError, match="shut down.*create a new LLM"):
        llm.generate("def ")
    llm = LLM("tiny", device="cpu", tensor_parallel_size=2)
    pids = llm.engine.tp.pids
    del llm
    gc.collect()
    assert _wait_gone(pids) == []


def test_an_exception_in_a_worker_is_a_clear_error_on_rank_0_and_stops_the_engine():
    llm = LLM("tiny", device="cpu", tensor_parallel_size=2, num_kv_blocks=40)
    pids = llm.engine.tp.pids
    assert llm.generate("def ", SamplingParams(max_tokens=3))[0].token_ids
    llm.engine.tp.inject_fault(1)
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"(?s)in a step: RuntimeError: fault injected on rank 1.*"
                                                  r"create a new LLM.*rank 1 raised:\nTraceback"):
        llm.generate(["def ", "class "], SamplingParams(max_tokens=5))
    assert time.monotonic() - t0 < 20
    assert _wait_gone(pids) == []
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == llm.engine.num_kv_blocks and not llm.engine.has_unfinished()   # rolled back
    with pytest.raises(TensorParallelError, match="create a new LLM"):
        llm.generate("def ")


def test_an_exception_on_rank_0_mid_forward_stops_the_workers(monkeypatch):
    from course_lib.engine.attention import TorchAttention

    llm = LLM("tiny", device="cpu", tensor_parallel_size=2)
    pids = llm.engine.tp.pids

    def broken(self, *args):          # rank 0 only: the workers wait in an all-reduce it never reaches
        raise RuntimeError("broken attention")

    monkeypatch.setattr(TorchAttention, "forward", broken)
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match="rank 0 raised RuntimeError\\('broken attention'\\)"):
        llm.generate("def ")
    assert time.monotonic() - t0 < 20 and _wait_gone(pids) == []


def test_an_exception_after_the_forward_rolls_back_and_the_ranks_go_on(pair, monkeypatch):
    """Sampling runs on rank 0 after every rank has finished the forward: the ranks stay in step."""
    from course_lib.engine import engine as engine_module

    one, two = pair
    real, calls = engine_module.sample, []

    def sample_once_broken(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("sampler failed")
        return real(*args)

    monkeypatch.setattr(engine_module, "sample", sample_once_broken)
    p = SamplingParams(max_tokens=10, ignore_eos=True)
    with pytest.raises(RuntimeError, match="sampler failed"):
        two.generate("def ", p)
    assert two.generate("def ", p)[0].token_ids == one.generate("def ", p)[0].token_ids


def test_a_worker_killed_between_steps_is_a_clear_error():
    llm = LLM("tiny", device="cpu", tensor_parallel_size=2)
    pid = llm.engine.tp.pids[0]
    os.kill(pid, signal.SIGKILL)
    assert _wait_gone([pid]) == []
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match="rank 1 exited with code -9"):
        llm.generate("def ")
    assert time.monotonic() - t0 < 20


def _script(body: str) -> subprocess.Popen:
    code = textwrap.dedent("""
        import os, sys, torch
        from course_lib.engine import LLM, SamplingParams
        if __name__ == "__main__":
            torch.set_num_threads(1)
            llm = LLM("tiny", device="cpu", tensor_parallel_size=2)
            print("pids", *llm.engine.tp.pids, flush=True)
    """) + textwrap.indent(textwrap.dedent(body), "    ")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _pids(proc) -> list[int]:
    line = proc.stdout.readline()
    assert line.startswith("pids"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return [int(p) for p in line.split()[1:]]


def test_workers_exit_when_rank_0_dies():
    proc = _script("os.kill(os.getpid(), 9)\n")
    pids = _pids(proc)
    proc.wait(timeout=60)
    assert proc.returncode == -9
    assert _wait_gone(pids) == []


def test_ctrl_c_rolls_the_step_back_and_exit_ends_the_workers():
    """SIGINT to the whole process group, as a terminal's Ctrl-C: the workers ignore it, rank 0
    raises KeyboardInterrupt after the step's forward, the engine goes on exactly; at exit the
    workers end."""
    proc = _script("""
        p = SamplingParams(max_tokens=100, ignore_eos=True)
        expected = llm.generate("def ", p)[0].token_ids
        print("generating", flush=True)
        try:
            while True:
                llm.generate(["def ", "The "] * 3, p)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        print("same", llm.generate("def ", p)[0].token_ids == expected, flush=True)
    """)
    pids = _pids(proc)
    assert proc.stdout.readline() == "generating\n"
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split("\n")[:2] == ["interrupted", "same True"], (out, err)
    assert _wait_gone(pids) == []


# ---------------------------------------------------------------------------------- command line
def test_cli_generate_with_two_ranks_matches_one(pair):
    one, _ = pair
    r = subprocess.run([sys.executable, "-m", "course_lib.engine", "generate", "--model", "tiny", "--device", "cpu",
                        "--prompt", "def ", "--max-tokens", "12", "--ignore-eos", "--tensor-parallel-size", "2"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert repr(one.generate("def ", SamplingParams(max_tokens=12, ignore_eos=True))[0].text) in r.stdout
    r = subprocess.run([sys.executable, "-m", "course_lib.engine", "generate", "--model", "tiny", "--device", "cpu",
                        "--prompt", "def ", "--tensor-parallel-size", "3"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "must divide the model's 4 heads" in r.stderr and "Traceback" not in r.stderr
