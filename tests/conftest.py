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


def check_books(engine):
    """The engine's blocks, references, free list, prefix-cache names and queues agree: every block
    is held by exactly the running requests that list it, waiting and finishing requests hold none,
    every cached name points at a block of that name, and no block waits for its name."""
    from course_lib.engine.sequence import SequenceStatus

    bm, sched = engine.block_manager, engine.scheduler
    holders = {}
    for seq in sched.running:
        assert seq.status == SequenceStatus.RUNNING
        assert len(seq.block_table) >= bm.blocks_needed(seq.num_computed_tokens)
        for b in seq.block_table:
            holders[b] = holders.get(b, 0) + 1
    for seq in sched.waiting:
        assert seq.status == SequenceStatus.WAITING and seq.block_table == [] and seq.num_computed_tokens == 0
    for seq in sched.finishing:
        assert seq.block_table == []
    for block in bm.blocks[1:]:
        assert block.ref_count == holders.get(block.block_id, 0), block
        assert (block.ref_count == 0) == (block.block_id in bm.free)
    for h, b in bm.cached.items():
        assert bm.blocks[b].block_hash == h
    assert not bm.pending, "blocks wait for a name between steps (the engine names them when it issues a step)"


def resume_exactly(engine, seqs, want, monkeypatch):
    """After a fault injected with ``monkeypatch``: the books balance; with the fault gone the
    requests run to the end and give exactly ``want``, and the books balance again."""
    check_books(engine)
    monkeypatch.undo()
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in seqs] == want
    check_books(engine)
