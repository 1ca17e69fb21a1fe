"""Bad input gets a clear error: token ids, shapes, lengths, configs, sampling arguments."""

import pytest
import torch

from conftest import random_model
from course_lib.config import GPTConfig
from course_lib.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def model():
    return random_model(GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))


@pytest.mark.parametrize("ids, message", [
    ([[1, 2, 50]], "token id 50 is out of range"),
    ([[-1, 2]], "token id -1 is out of range"),
    (torch.zeros(1, 17, dtype=torch.long), "longer than the model's context"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    (torch.zeros(2, 3, 4, dtype=torch.long), r"shape \(T,\) or \(B, T\)"),
    (torch.zeros(1, 3), "must be integers"),
    ("hello", "tensor or nested list of ints"),
])
def test_bad_token_ids(model, ids, message):
    with pytest.raises(InputError, match=message):
        model(ids)


def test_too_long_counting_the_cache(model):
    _, cache = model.prefill(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(InputError, match=r"17 tokens \(16 cached \+ 1 new\)"):
        model.decode_step(torch.tensor([1]), cache)


def test_decode_needs_prefill_and_one_token(model):
    from course_lib.model import KVCache

    with pytest.raises(InputError, match="prefill first"):
        model.decode_step(torch.tensor([1]), KVCache())
    _, cache = model.prefill(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(InputError, match="one token per sequence"):
        model.decode_step(torch.tensor([[1, 2]]), cache)


def test_batch_mismatch_with_cache(model):
    _, cache = model.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(InputError, match="does not match the cache's batch"):
        model.decode_step(torch.tensor([1, 2, 3]), cache)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=5, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=5, top_k=-2), "top_k"),
    (dict(max_new_tokens=20), "exceeds the context"),
])
def test_bad_generation_arguments(model, kwargs, message):
    with pytest.raises(InputError, match=message):
        model.generate(torch.zeros(1, 3, dtype=torch.long), **kwargs)


def test_bad_top_p():
    from course_lib.sampling import check_sampling_args

    for p in (0.0, 1.5, -0.1):
        with pytest.raises(InputError, match="top_p"):
            check_sampling_args(top_p=p)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(n_positions=10**9), "n_positions"),
    (dict(n_head=2.5), "must be an integer"),
    (dict(activation_function="swish"), "not supported"),
    (dict(layer_norm_epsilon=0), "layer_norm_epsilon"),
    (dict(attn_pdrop=1.5), "attn_pdrop"),
    (dict(eos_token_id=5000), "eos_token_id"),
])
def test_absurd_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(**kwargs)


def test_config_missing_field():
    with pytest.raises(ConfigError, match=r"missing required field\(s\) \['n_head'\]"):
        GPTConfig.from_dict({"vocab_size": 10, "n_positions": 8, "n_embd": 8, "n_layer": 1})


def test_config_from_other_model_type():
    with pytest.raises(ConfigError, match="not a GPT-2 model"):
        GPTConfig.from_dict({"model_type": "llama"})


def test_loss_target_shape(model):
    with pytest.raises(InputError, match="do not match"):
        model.loss(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
