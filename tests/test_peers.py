"""The plain-PyTorch peer of benchmarks/peers.py: same greedy tokens as the reference GPT (CPU, eager)."""

import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import RANDOM_CONFIGS, random_model
from course_lib.config import GPTConfig
from course_lib.errors import InputError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from peers import StaticCacheGPT  # noqa: E402


@pytest.mark.parametrize("cfg", range(len(RANDOM_CONFIGS)), ids=lambda i: f"cfg{i}")
@pytest.mark.parametrize("batch", [1, 3])
def test_peer_greedy_equals_reference_generate(cfg, batch):
    config = GPTConfig(**RANDOM_CONFIGS[cfg])
    model = random_model(config, seed=cfg)
    T, new = 5, min(10, config.n_positions - 5)
    idx = torch.randint(0, config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(cfg))
    want = model.generate(idx, new)
    peer = StaticCacheGPT(model, batch, T + new)
    peer.capture()                                   # the warm-up writes slots that prefill then overwrites
    assert torch.equal(peer.generate(idx, new), want)
    assert torch.equal(peer.generate(idx, new), want)   # a second run on the same cache: same tokens
    assert not peer.graphs and peer.compile_seconds == 0


def test_peer_uses_the_models_weights_without_copying():
    model = random_model(GPTConfig(**RANDOM_CONFIGS[1]))
    peer = StaticCacheGPT(model, 2, 20)
    idx = torch.randint(0, 300, (2, 4))
    before = peer.generate(idx, 6)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
    assert torch.equal(peer.generate(idx, 6), model.generate(idx, 6))
    assert not torch.equal(peer.generate(idx, 6), before)


def test_peer_bad_shapes_are_clear_errors():
    model = random_model(GPTConfig(**RANDOM_CONFIGS[0]))
    with pytest.raises(InputError, match="exceeds the model's n_positions"):
        StaticCacheGPT(model, 1, 17)
    peer = StaticCacheGPT(model, 2, 10)
    with pytest.raises(InputError, match="do not fit this peer's batch 2"):
        peer.prefill(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(InputError, match="exceed max_len=10"):
        peer.generate(torch.zeros(2, 4, dtype=torch.long), 7)
    peer.prefill(torch.zeros(2, 8, dtype=torch.long))
    peer.step()
    peer.step()
    with pytest.raises(InputError, match="cache of 10 slots is full"):
        peer.step()


@pytest.mark.skipif(not os.environ.get("COURSE_TEST_COMPILE"), reason="torch.compile takes ~30 s on CPU; "
                    "set COURSE_TEST_COMPILE=1")
def test_compiled_peer_equals_reference_generate():
    model = random_model(GPTConfig(**RANDOM_CONFIGS[1]))
    idx = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(0))
    peer = StaticCacheGPT(model, 3, 15, compile=True)
    peer.capture()
    assert peer.compile_seconds > 0
    assert torch.equal(peer.generate(idx, 10), model.generate(idx, 10))
