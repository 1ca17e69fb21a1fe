"""Notebook 01's embedding explorer and notebook 05's block explorer, without a browser."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from course_lib import GPT, GPTConfig  # noqa: E402
from course_lib.errors import CourseError, InputError  # noqa: E402
from course_lib.widgets.block import PARTS, BlockExplorer, block_figure, block_views  # noqa: E402
from course_lib.widgets.embeddings import EmbeddingExplorer, embedding_summary, embedding_views  # noqa: E402

PROMPT = "A list is a mutable sequence."


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()


def test_embedding_views_are_wte_plus_wpe(model, tok):
    v = embedding_views(model, tok, PROMPT)
    ids = torch.tensor(v["ids"])
    wte, wpe = model.transformer.wte.weight.detach(), model.transformer.wpe.weight.detach()
    assert torch.equal(v["tok"], wte[ids]) and torch.equal(v["pos"], wpe[: len(ids)])
    assert torch.allclose(v["sum"], wte[ids] + wpe[: len(ids)])
    text = embedding_summary(v)
    assert f"(1, {len(ids)}, 32)" in text and " ".join(map(str, v["ids"][:4])) in text and "\n" not in text


def test_block_views_norms(model, tok):
    v = block_views(model, tok, PROMPT, layer=1)
    assert set(v["norms"]) == set(PARTS)
    n = v["norms"]
    # the block's output is its input plus the two updates: the triangle inequality bounds its length
    assert (n["output"] <= n["input x"] + n["attention adds"] + n["MLP adds"] + 1e-4).all()
    fig = block_figure(v)
    assert len(fig.axes[0].patches) == 4 * len(v["ids"])
    with pytest.raises(InputError, match="layer=2"):
        block_views(model, tok, PROMPT, layer=2)


def test_explorers_show_messages_and_recover(model, tok):
    for ex in (EmbeddingExplorer(model, tok, PROMPT), BlockExplorer(model, tok, PROMPT)):
        assert ex.message is None and bytes(ex.image.value)[:4] == b"\x89PNG"
        for bad, fragment in [("", "empty"), ("ç", "alphabet"), ("word " * 20, "shorten")]:
            ex.prompt.value = bad
            assert fragment in ex.message
            assert ex.output.outputs[0]["data"]["text/plain"].startswith("⚠")
        ex.prompt.value = PROMPT
        assert ex.message is None


def test_plain_functions_raise_course_errors(model, tok):
    for fn in (embedding_views, block_views):
        with pytest.raises(CourseError):
            fn(model, tok, "")
