"""The command line and the benchmark script, end to end on CPU (tiny shapes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_cli_generate_tiny_matches_library():
    r = _run("-m", "course_lib.engine", "generate", "--model", "tiny", "--prompt", "def ", "--max-tokens", "12",
             "--ignore-eos")
    assert r.returncode == 0, r.stderr
    from course_lib.engine import LLM, SamplingParams

    text = LLM("tiny").generate("def ", SamplingParams(max_tokens=12, ignore_eos=True))[0].text
    assert repr(text) in r.stdout and "12 tokens" in r.stdout


def test_cli_generate_bad_input_is_a_clear_error():
    r = _run("-m", "course_lib.engine", "generate", "--model", "tiny", "--prompt", "x", "--max-tokens", "0")
    assert r.returncode == 2 and "max_tokens must be a positive integer" in r.stderr and "Traceback" not in r.stderr


def test_cli_bench_smoke():
    r = _run("-m", "course_lib.engine", "bench", "--model", "smoke", "--batches", "1,2", "--prompt-len", "32",
             "--context", "16", "--decode-steps", "4", "--num-requests", "3", "--serving-min-len", "4",
             "--serving-max-len", "8", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout.strip().splitlines()[-1])
    assert {x["workload"] for x in data["runs"]} == {"prefill", "decode", "serving"}
    assert all(x["tokens_per_s"] > 0 for x in data["runs"])


def test_bench_script_smoke_writes_results(tmp_path):
    pytest.importorskip("transformers")
    r = _run("benchmarks/bench_engine.py", "--smoke", "--out", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = tmp_path.glob("*_smoke.json")
    data = json.loads(path.read_text())
    assert {"device", "torch", "transformers", "ceilings", "runs"} <= set(data)
    assert set(data["ceilings"]) == {"matmul_bf16_tflops", "copy_gbps"}
    keys = {"system", "model", "workload", "batch", "prompt_len", "context", "tokens_per_s", "mfu", "mbu"}
    assert all(keys <= set(run) for run in data["runs"])
    systems = {(x["system"], x["workload"]) for x in data["runs"] if x["tokens_per_s"]}
    assert {("engine", "prefill"), ("engine", "decode"), ("engine", "serving"),
            ("hf-generate", "prefill"), ("hf-generate", "decode"),
            ("torch-graph", "prefill"), ("torch-graph", "decode"),
            ("torch-compile", "prefill"), ("torch-compile", "decode")} <= systems
    peers = [x for x in data["runs"] if x["system"] in ("torch-graph", "torch-compile")]
    assert all(not x["compiled"] and not x["cuda_graph"] and x["mbu"] > 0 for x in peers)   # CPU: eager
    engine = [x for x in data["runs"] if x["system"] == "engine" and x["workload"] in ("prefill", "decode")]
    assert all(x["vs_torch_compile"] > 0 and x["vs_transformers"] > 0 for x in engine)
    assert "engine vs torch.compile" in r.stdout
    assert "| model | workload |" in r.stdout


def test_probe_host_smoke_splits_each_prefill_call(tmp_path):
    """benchmarks/probe_host.py runs on the CPU: each prefill call is split at its launch and its token
    read into parts that add up to no more than the call, and the serving row makes every token."""
    r = _run("benchmarks/probe_host.py", "--smoke", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = tmp_path.glob("*_host_*_smoke.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(x["workload"], x["batch"]) for x in rows] == [("prefill", 8), ("prefill", 1), ("decode", 1),
                                                           ("decode", 32), ("serving", 16)]
    for x in rows:
        assert len(x["ms"]) >= 1 and all(t > 0 for t in x["ms"])
        if x["workload"] == "prefill":
            parts = x["before_launch_ms"] + x["overlappable_ms"] + x["after_read_ms"]
            assert 0 < x["before_launch_ms"] and parts <= max(x["ms"]) * 1.001, x
    serving = rows[-1]
    assert serving["output_tokens"] > 16 and serving["steps"] > 0 and serving["host_bound_tokens_per_s"] > 0


def test_bench_script_tensor_parallel_rows(tmp_path):
    """--tensor-parallel-size 1,2 gives one engine row per rank count, each saying its count
    (on CPU the two ranks talk through gloo; no all-reduce time is profiled there)."""
    r = _run("benchmarks/bench_engine.py", "--smoke", "--systems", "engine", "--workloads", "decode",
             "--tensor-parallel-size", "1,2", "--out", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = tmp_path.glob("*_smoke.json")
    runs = json.loads(path.read_text())["runs"]
    assert sorted((x["tensor_parallel_size"], x["batch"]) for x in runs) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(x["tokens_per_s"] > 0 and x["allreduce_ms_per_step"] is None for x in runs)
    assert "engine TP=2" in r.stdout


def test_cli_generate_checkpoint_with_token_ids(tmp_path):
    import torch

    from course_lib import checkpoint
    from course_lib.config import GPTConfig
    from course_lib.engine import LLM, SamplingParams
    from course_lib.model import GPT

    torch.manual_seed(0)
    checkpoint.save(GPT(GPTConfig(vocab_size=120, n_positions=32, n_embd=32, n_layer=1, n_head=2)), tmp_path)
    r = _run("-m", "course_lib.engine", "generate", "--model", str(tmp_path), "--prompt-ids", "5,6,7",
             "--max-tokens", "6", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    want = LLM(tmp_path).generate([[5, 6, 7]], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    assert " ".join(map(str, want)) in r.stdout
    r = _run("-m", "course_lib.engine", "generate", "--model", str(tmp_path), "--prompt", "hello")
    assert r.returncode == 2 and "no tokenizer" in r.stderr


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt-ids", "1,x"], "is not a comma-separated list of integers"),
    (["generate", "--prompt", "a", "--seed", "x"], "argument --seed: invalid int value"),
    (["bench", "--batches", "a"], "is not a comma-separated list of integers"),
    (["bench", "--batches", "0,8"], "every value must be a positive integer"),
    (["bench", "--workloads", "decod"], "unknown workload(s) ['decod']"),
    (["generate", "--prompt", "a", "--block-size", "0"], "block_size must be a positive integer"),
    (["generate", "--prompt", "a", "--attention", "flash"], "invalid choice: 'flash'"),
])
def test_every_bad_flag_is_one_line_and_exit_2(argv, message):
    r = subprocess.run([sys.executable, "-m", "course_lib.engine", *argv, "--device", "cpu"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_cli_async_scheduling_flag_reaches_the_config():
    import argparse

    from course_lib.engine.__main__ import add_engine_arguments, engine_config

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    got = {v: engine_config(parser.parse_args(["--async-scheduling", v])).async_scheduling for v in ("auto", "on", "off")}
    assert got == {"auto": None, "on": True, "off": False}


def test_cli_decode_burst_flag_reaches_the_config():
    import argparse

    from course_lib.engine.__main__ import add_engine_arguments, engine_config

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_config(parser.parse_args([])).decode_burst is None
    assert engine_config(parser.parse_args(["--decode-burst", "4"])).decode_burst == 4

