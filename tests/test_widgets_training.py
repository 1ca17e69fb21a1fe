"""The live loss curve as a training callback, and the sampling widget (no browser)."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from course_lib import GPT, GPTConfig  # noqa: E402
from course_lib.errors import CourseError, InputError  # noqa: E402
from course_lib.train import TrainSettings, train  # noqa: E402
from course_lib.widgets.sampling import SamplingExplorer, next_token_table, sample_text  # noqa: E402
from course_lib.widgets.training import LiveLossCurve  # noqa: E402


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()


def test_live_loss_curve_is_a_train_callback(model, tok):
    stream = torch.tensor(tok.encode("The for statement is used to iterate over a list. " * 20))
    live = LiveLossCurve(total_steps=12, every=4, min_seconds=0.0, vocab_size=tok.vocab_size)
    model_copy = GPT(model.config)
    settings = TrainSettings(steps=12, batch_size=4, block_size=16, warmup_steps=2, eval_every=6)
    record = train(model_copy, stream, stream, settings, callback=live, progress=False)
    assert live.steps == record.steps and live.train_loss == pytest.approx(record.train_loss)
    assert live.val_steps == record.val_steps and live.val_loss == pytest.approx(record.val_loss)
    assert live.redraws >= 3                       # it redrew while training, not only at the end
    assert bytes(live.image.value)[:4] == b"\x89PNG"
    assert "step 12" in live.label.value and "validation" in live.label.value


def test_sample_text_and_bad_input(model, tok):
    a = sample_text(model, tok, "The for", temperature=0.0, max_new_tokens=5)
    b = sample_text(model, tok, "The for", temperature=0.0, max_new_tokens=5, seed=3)
    assert a == b and a.startswith("The for")      # greedy ignores the seed
    c1 = sample_text(model, tok, "The for", temperature=1.5, max_new_tokens=8, seed=1)
    c2 = sample_text(model, tok, "The for", temperature=1.5, max_new_tokens=8, seed=1)
    assert c1 == c2                                # a seed makes sampling repeatable
    odds = next_token_table(model, tok, "The for", temperature=1.0, k=4)
    assert len(odds) == 4 and odds[0][1] >= odds[-1][1]
    hot = next_token_table(model, tok, "The for", temperature=3.0, k=1)[0][1]
    cold = next_token_table(model, tok, "The for", temperature=0.3, k=1)[0][1]
    assert cold > odds[0][1] > hot
    with pytest.raises(InputError, match="temperature"):
        sample_text(model, tok, "The", temperature=-1)
    with pytest.raises(InputError, match="shorten"):
        sample_text(model, tok, "word " * 30, max_new_tokens=5)
    with pytest.raises(CourseError, match="alphabet"):
        sample_text(model, tok, "ß")


def test_sampling_explorer_survives_bad_input(model, tok):
    ex = SamplingExplorer(model, tok, "The for", max_new_tokens=6)
    assert ex.message is None and "The for" in ex.summary
    ex.temperature.value = 0.0
    assert ex.summary.startswith("greedy")
    for bad in ["", "ß", "word " * 40]:
        ex.prompt.value = bad
        assert ex.message and ex.output.outputs[0]["data"]["text/plain"].startswith("⚠")
    ex.prompt.value = "A list"
    assert ex.message is None and "A list" in ex.summary


def test_sampler_says_how_many_positions_are_left_after_the_tokens_to_generate(tok):
    import pytest

    from course_lib.errors import InputError
    from course_lib.widgets.common import prompt_ids

    with pytest.raises(InputError, match="only 3 of the model's 5 positions are left after the 2 tokens"):
        prompt_ids(tok, "The for statement is used to iterate", 3, reserved=2)
