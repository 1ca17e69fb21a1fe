import pytest
import torch

from course_lib.config import GPTConfig
from course_lib.errors import InputError
from course_lib.model import GPT
from course_lib.train import TrainSettings, evaluate, learning_rate, train


def test_learning_rate_schedule():
    s = TrainSettings(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert learning_rate(0, s) == pytest.approx(1e-4)
    assert learning_rate(9, s) == pytest.approx(1e-3)
    assert learning_rate(99, s) == pytest.approx(1e-4, rel=1e-2)
    lrs = [learning_rate(i, s) for i in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_training_learns_a_repeating_pattern():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=12, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = GPT(config)
    stream = torch.arange(12).repeat(60)  # 0 1 2 ... 11 0 1 2 ...
    seen = []
    record = train(model, stream, stream, TrainSettings(steps=60, batch_size=8, lr=1e-2, warmup_steps=5,
                                                        eval_every=30), callback=lambda *a: seen.append(a),
                   progress=False)
    assert len(seen) == 60 and seen[29][2] is not None and seen[0][2] is None
    assert record.val_loss[-1] < 0.3 < record.train_loss[0]
    assert evaluate(model, stream) == pytest.approx(record.val_loss[-1], rel=1e-5)


def test_bad_settings():
    with pytest.raises(InputError, match="steps"):
        TrainSettings(steps=0)
    with pytest.raises(InputError, match="lr"):
        TrainSettings(lr=2.0)
    model = GPT(GPTConfig(vocab_size=12, n_positions=8, n_embd=8, n_layer=1, n_head=1))
    with pytest.raises(InputError, match="shorter than one window"):
        evaluate(model, torch.arange(5))
    with pytest.raises(InputError, match="exceeds the model's n_positions"):
        train(model, torch.arange(100) % 12, torch.arange(100) % 12, TrainSettings(steps=1, block_size=9),
              progress=False)
