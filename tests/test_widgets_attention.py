"""The attention widgets' plain functions, and their update handlers called directly (no browser).

A small random model with a short context keeps these fast; the steps are checked against the
model's own trace, so the widgets show exactly what the model computes.
"""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from course_lib import GPT, GPTConfig  # noqa: E402
from course_lib.errors import CourseError, InputError, TokenizerError  # noqa: E402
from course_lib.widgets import attention as wa  # noqa: E402
from course_lib.widgets.common import figure_png, prompt_ids  # noqa: E402

PROMPT = "The for statement is used to iterate"
BAD_PROMPTS = {"é": "alphabet", "": "empty", "   ": "empty"}


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=24, n_embd=32, n_layer=2, n_head=4)
    return GPT(cfg).eval()


def long_prompt(model):
    return "word " * (model.config.n_positions + 5)


def test_prompt_ids_messages(tok):
    assert prompt_ids(tok, PROMPT, 100) == tok.encode(PROMPT)
    with pytest.raises(InputError, match="empty"):
        prompt_ids(tok, "  \n", 100)
    with pytest.raises(TokenizerError, match="not in this tokenizer's alphabet"):
        prompt_ids(tok, "naïve", 100)
    with pytest.raises(InputError, match="context holds 3; shorten it"):
        prompt_ids(tok, PROMPT, 3)


def test_attention_steps_match_the_model(model, tok):
    v = wa.attention_views(model, tok, PROMPT, query_index=4, layer=1, head=2)
    T = len(v["ids"])
    s = v["steps"]
    assert torch.allclose(s["weights"], v["model_weights"], atol=1e-6)
    assert torch.equal(s["mask"], torch.tril(torch.ones(T, T, dtype=torch.bool)))
    assert torch.isinf(s["masked"][~s["mask"]]).all()
    assert torch.allclose(s["weights"].sum(-1), torch.ones(T))
    assert torch.allclose(s["scaled"], s["scores"] / (model.config.head_dim ** 0.5))
    assert v["future_weight"] == 0.0 and v["labels"][4] == tok.labels(v["ids"])[4]


def test_temperature_and_mask_toggle(model, tok):
    base = wa.attention_views(model, tok, PROMPT, 2)
    hot = wa.attention_views(model, tok, PROMPT, 2, temperature=4.0)
    cold = wa.attention_views(model, tok, PROMPT, 2, temperature=0.1)
    # flatter at high temperature, sharper at low: the largest weight moves accordingly
    assert hot["row"].max() < base["row"].max() < cold["row"].max()
    leak = wa.attention_views(model, tok, PROMPT, 2, mask_on=False)
    assert leak["future_weight"] > 0.01            # future tokens leak in without the mask
    assert torch.allclose(leak["row"].sum(), torch.tensor(1.0))
    with pytest.raises(InputError, match="temperature"):
        wa.attention_steps(torch.zeros(2, 4), torch.zeros(2, 4), temperature=0)


@pytest.mark.parametrize("prompt,fragment", list(BAD_PROMPTS.items()))
def test_plain_functions_reject_bad_prompts(model, tok, prompt, fragment):
    for fn in (lambda p: wa.attention_views(model, tok, p, 0), lambda p: wa.qkv_views(model, tok, p),
               lambda p: wa.head_views(model, tok, p)):
        with pytest.raises(CourseError, match=fragment):
            fn(prompt)


def test_plain_functions_reject_long_prompts_and_bad_indices(model, tok):
    with pytest.raises(InputError, match="shorten it"):
        wa.attention_views(model, tok, long_prompt(model), 0)
    with pytest.raises(InputError, match="query_index=50 is out of range"):
        wa.attention_views(model, tok, PROMPT, 50)
    with pytest.raises(InputError, match="head=4"):
        wa.head_views(model, tok, PROMPT, head=4)
    with pytest.raises(InputError, match="layer=2"):
        wa.qkv_views(model, tok, PROMPT, layer=2)


def test_qkv_views_are_the_projections(model, tok):
    v = wa.qkv_views(model, tok, PROMPT, layer=0)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        q, k, val = attn.c_attn(v["x"]).split(model.config.n_embd, dim=-1)   # (T, D) each
    assert torch.allclose(v["q"], q, atol=1e-5) and torch.allclose(v["k"], k, atol=1e-5)
    assert torch.allclose(v["v"], val, atol=1e-5)
    fig = wa.qkv_figure(v)
    assert len(fig.axes) == 3
    figure_png(fig)


def test_head_views_merge_is_concatenation(model, tok):
    v = wa.head_views(model, tok, PROMPT, layer=1, head=3)
    H, T, Dh = v["head_out"].shape
    assert torch.equal(v["merged"], v["head_out"].transpose(0, 1).reshape(T, H * Dh))
    c_proj = model.transformer.h[1].attn.c_proj
    with torch.no_grad():
        assert torch.allclose(c_proj(v["merged"]), v["out"], atol=1e-5)
    png = figure_png(wa.head_figure(v))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "previous token" in wa.head_summary(v)


def test_attention_explorer_updates_and_survives_bad_input(model, tok):
    ex = wa.AttentionExplorer(model, tok, PROMPT, query_index=1)
    assert ex.message is None and ex.image.value[:4] == b"\x89PNG"
    first_summary, first_png = ex.summary, bytes(ex.image.value)
    ex.query.value = 4                              # moving the slider re-runs update()
    assert ex.summary != first_summary and bytes(ex.image.value) != first_png
    assert f"query 4 {ex.views['labels'][4]!r}" in ex.summary
    for prompt in ["é", "", long_prompt(model)]:
        ex.prompt.value = prompt
        assert ex.message, prompt
        shown = ex.output.outputs[0]["data"]["text/plain"]
        assert shown.startswith("⚠") and "Traceback" not in shown
        assert bytes(ex.image.value) == b""
    ex.prompt.value = "a b c"                       # the widget keeps working afterwards
    assert ex.message is None
    assert ex.query.max == 2 and ex.query.value == 2   # the slider now spans the 3 tokens
    ex.mask.value = False
    assert "mask OFF" in ex.summary and ex.views["future_weight"] == 0.0   # last query: no future
    ex.query.value = 0
    assert ex.views["future_weight"] > 0
    ex.update()                                     # calling the handler directly works too
    assert ex.message is None


def test_qkv_and_head_explorers(model, tok):
    q = wa.QKVExplorer(model, tok, PROMPT)
    assert q.message is None and "tokens" in q.summary
    q.prompt.value = "ü"
    assert "alphabet" in q.message
    q.prompt.value = PROMPT
    q.layer.value = 1
    assert q.message is None
    h = wa.HeadExplorer(model, tok, PROMPT)
    before = bytes(h.image.value)
    h.head.value = 2
    assert h.message is None and bytes(h.image.value) != before and "head 2" in h.summary
    h.prompt.value = long_prompt(model)
    assert "shorten" in h.message
    h.prompt.value = PROMPT
    assert h.message is None


def test_explorer_turns_any_exception_into_a_message():
    from course_lib.widgets.common import Explorer
    import ipywidgets as widgets

    class Flaky(Explorer):
        def __init__(self):
            self.box = widgets.IntSlider(value=0)
            super().__init__([self.box])

        def compute(self):
            if self.box.value == 1:
                raise RuntimeError("boom")
            return f"value {self.box.value}", b"\x89PNG fake"

    ex = Flaky()
    ex.update()
    assert ex.message is None and ex.summary == "value 0"
    ex.box.value = 1
    assert "RuntimeError: boom" in ex.message
    assert "unexpected problem" in ex.output.outputs[0]["data"]["text/plain"]
    ex.box.value = 2
    assert ex.message is None and ex.summary == "value 2"
