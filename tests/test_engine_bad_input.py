"""Bad input: a clear CourseError each, and the same engine then serves a valid request."""

import pytest
import torch

from conftest import random_model
from course_lib import checkpoint
from course_lib.config import GPTConfig
from course_lib.engine import LLM, SamplingParams
from course_lib.errors import CheckpointError, ConfigError, CourseError, InputError

CFG = GPTConfig(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=2)
GOOD = [4, 5, 6]


@pytest.fixture(scope="module")
def llm():
    return LLM(random_model(CFG), block_size=4, num_kv_blocks=12)


@pytest.fixture(scope="module")
def expected(llm):
    return llm.generate([GOOD], SamplingParams(max_tokens=4))[0].token_ids


def _still_serves(llm, expected):
    assert not llm.engine.has_unfinished()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    assert llm.generate([GOOD], SamplingParams(max_tokens=4))[0].token_ids == expected


@pytest.mark.parametrize("prompt, message", [
    ([], "prompt is empty"),
    (list(range(33)), "longer than the model's context of n_positions=32"),
    ([1, 101, 2], "token id 101 is out of range"),
    ([1, -1], "token id -1 is out of range"),
    ([1.5, 2], "list of integer token ids"),
    ([True, False], "list of integer token ids"),          # bools are not token ids, alone or mixed in
    ([5, 7, True], "list of integer token ids"),
    ([3, [4]], "list of integer token ids"),
    ([2 ** 70, 1], "token id 1180591620717411303424 is out of range"),
    ("some text", "no tokenizer"),
])
def test_bad_prompts(llm, expected, prompt, message):
    with pytest.raises(InputError, match=message):
        llm.generate([GOOD, prompt], SamplingParams(max_tokens=4))
    _still_serves(llm, expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens must be a positive integer"),
    (dict(max_tokens=-3), "max_tokens must be a positive integer"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be a non-negative integer"),
])
def test_bad_sampling_params(llm, expected, kwargs, message):
    with pytest.raises(InputError, match=message):
        SamplingParams(**kwargs)
    p = SamplingParams()
    for k, v in kwargs.items():                  # changed after construction: caught at add time
        setattr(p, k, v)
    with pytest.raises(InputError, match=message):
        llm.generate([GOOD], p)
    _still_serves(llm, expected)


def test_max_tokens_past_context(llm, expected):
    with pytest.raises(InputError, match="exceeds the context of n_positions=32; ask for at most 29"):
        llm.generate([GOOD], SamplingParams(max_tokens=30))
    _still_serves(llm, expected)


def test_request_bigger_than_kv_pool(llm, expected):
    # 12 blocks of 4 = 48 slots, but the model context is 32: make the pool smaller
    small = LLM(random_model(CFG), block_size=4, num_kv_blocks=3)
    with pytest.raises(InputError, match="KV pool is too small for this request: it needs 4 blocks"):
        small.generate([[1] * 10], SamplingParams(max_tokens=4))
    assert small.generate([[1] * 5], SamplingParams(max_tokens=4))[0].token_ids   # 8 tokens: 2 blocks
    _still_serves(llm, expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_kv_blocks=0), "num_kv_blocks must be a positive integer"),
    (dict(block_size=0), "block_size must be a positive integer"),
    (dict(max_num_seqs=0), "max_num_seqs must be a positive integer"),
    (dict(gpu_memory_fraction=0.5), "gpu_memory_fraction needs a CUDA device"),
    (dict(attention="flash9"), "unknown attention"),
    (dict(device="cuda"), "no CUDA GPU is available") if not torch.cuda.is_available() else
    (dict(device="tpu"), "not supported"),
])
def test_bad_engine_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LLM(random_model(CFG), **kwargs)


def test_chunked_off_needs_budget_for_a_whole_request(expected):
    llm = LLM(random_model(CFG), block_size=4, enable_chunked_prefill=False, max_num_batched_tokens=8)
    with pytest.raises(InputError, match="chunked prefill off a request must fit in one step"):
        llm.generate([[1] * 8], SamplingParams(max_tokens=4))
    assert llm.generate([GOOD], SamplingParams(max_tokens=4))[0].token_ids == expected


def test_missing_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        LLM(tmp_path / "nope")
    d = checkpoint.save(random_model(CFG), tmp_path / "ckpt")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        LLM(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        LLM(d)
    good = checkpoint.save(random_model(CFG), tmp_path / "good")
    assert len(LLM(good, block_size=4).generate([GOOD], SamplingParams(max_tokens=4))[0].token_ids) == 4


def test_dtype_the_device_cannot_run():
    # float8: torch has no CPU LayerNorm (nor add, nor softmax) for it; the engine says so up front
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.nn.functional.layer_norm(torch.randn(2, 4).to(torch.float8_e4m3fn), (4,))
    with pytest.raises(ConfigError, match="must be float32, bfloat16 or float16"):
        LLM(random_model(CFG), dtype=torch.float8_e4m3fn)
    with pytest.raises(ConfigError, match="dtype 'int8' is unknown"):
        LLM(random_model(CFG), dtype="int8")
    with pytest.raises(ConfigError, match="must be float32, bfloat16 or float16"):
        LLM(random_model(CFG), dtype=torch.float64)
    llm = LLM(random_model(CFG), dtype="bfloat16", block_size=4)
    assert llm.engine.kv_cache.pool.dtype == torch.bfloat16
    assert len(llm.generate([GOOD], SamplingParams(max_tokens=3))[0].token_ids) == 3


def test_errors_are_course_errors():
    assert issubclass(InputError, CourseError) and issubclass(ConfigError, CourseError)
