import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(int(os.environ.get("COURSE_TEST_THREADS", "1")))

from course_lib.config import GPTConfig  # noqa: E402

# Random configs that differ in depth, heads, width, vocabulary and context.
RANDOM_CONFIGS = [
    dict(vocab_size=97, n_positions=16, n_embd=32, n_layer=1, n_head=1),
    dict(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=3),
    dict(vocab_size=1024, n_positions=40, n_embd=64, n_layer=3, n_head=8, n_inner=96),
    dict(vocab_size=517, n_positions=128, n_embd=96, n_layer=4, n_head=4, layer_norm_epsilon=1e-6),
]


@pytest.fixture(params=range(len(RANDOM_CONFIGS)), ids=lambda i: f"cfg{i}")
def random_config(request) -> GPTConfig:
    return GPTConfig(**RANDOM_CONFIGS[request.param])


def random_model(config: GPTConfig, seed: int = 0):
    """A GPT with random weights, LayerNorm and biases included (not the trivial init)."""
    from course_lib.model import GPT

    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def tok():
    """The shipped tokenizer."""
    from course_lib.tiny import load_tokenizer

    return load_tokenizer()


def run_interpreted(script: str, marker: str, timeout: float = 400) -> str:
    """Run ``script`` in a fresh Python with ``TRITON_INTERPRET=1`` (the Triton kernels then run on
    the CPU; the variable must be set before they are defined) and return its output, which must
    contain ``marker``."""
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert marker in r.stdout, r.stdout
    return r.stdout
