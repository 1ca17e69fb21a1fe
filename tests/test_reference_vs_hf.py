"""Invariant 1: the reference GPT computes what transformers' GPT2LMHeadModel computes."""

import pytest
import torch

from conftest import random_model
from course_lib import checkpoint
from course_lib.config import GPTConfig

transformers = pytest.importorskip("transformers")


def _ids(config, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, config.n_positions), generator=g)


def test_ours_loads_in_transformers(random_config, tmp_path):
    ours = random_model(random_config)
    checkpoint.save(ours, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = _ids(random_config)
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)).abs().max().item()
    assert diff <= 1e-4, diff


def test_transformers_loads_in_ours(random_config, tmp_path):
    hf_config = transformers.GPT2Config(**random_config.to_hf_dict())
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)
    ours = checkpoint.load(tmp_path)
    idx = _ids(random_config, seed=2)
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)).abs().max().item()
    assert diff <= 1e-4, diff


def test_greedy_generation_matches_transformers(tmp_path):
    config = GPTConfig(vocab_size=200, n_positions=48, n_embd=32, n_layer=2, n_head=2)
    ours = random_model(config, seed=5)
    checkpoint.save(ours, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(0))
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=20), expected)
