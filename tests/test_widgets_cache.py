"""The decode widget's logic: cache growth, bytes formula vs allocation, the new query's row."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import random_model  # noqa: E402

from course_lib.config import GPTConfig  # noqa: E402
from course_lib.errors import InputError  # noqa: E402
from course_lib.model import Trace  # noqa: E402
from course_lib.viz.cache import draw_cache_view, plot_cache_bytes  # noqa: E402
from course_lib.widgets.cache import build_cache_widget, cache_summary, cache_view, record_decode  # noqa: E402

CFG = GPTConfig(vocab_size=60, n_positions=32, n_embd=24, n_layer=3, n_head=3)


@pytest.fixture(scope="module")
def record():
    return record_decode(random_model(CFG), [[5, 9, 2, 7]], n_new=6)


def test_cache_grows_one_position_per_step(record):
    assert record.n_steps == 6
    assert record.seq_lens == [4, 5, 6, 7, 8, 9]
    assert len(record.ids) == 4 + 6
    assert record.cache.keys[2].shape == (1, 3, 9, 8)


def test_bytes_formula_equals_allocation_every_step(record):
    for s in range(record.n_steps):
        v = cache_view(record, s)
        assert v["bytes_formula"] == v["bytes_allocated"] == 2 * 3 * 3 * (4 + s) * 8 * 4


def test_view_rows_and_attention_row(record):
    m = random_model(CFG)
    ids = torch.tensor([record.ids[:7]])
    tr = Trace()
    m(ids, trace=tr)
    v = cache_view(record, 3, layer=1, head=2, which="k")
    assert v["seq_len"] == 7 and v["rows"].shape == (7, 8)
    assert torch.allclose(torch.from_numpy(v["rows"]), tr["h1.attn.k"][0, 2], atol=1e-5)
    assert torch.allclose(torch.from_numpy(v["attn"]), tr["h1.attn.weights"][0, 2, -1], atol=1e-5)
    assert v["attn"].sum() == pytest.approx(1.0, abs=1e-5)
    vv = cache_view(record, 3, layer=1, head=2, which="v")
    assert torch.allclose(torch.from_numpy(vv["rows"]), tr["h1.attn.v"][0, 2], atol=1e-5)


def test_summary_line(record):
    line = cache_summary(cache_view(record, 2))
    assert line == ("step 2 (decode): 6 positions cached in each of 3 layers × 3 heads; "
                    "formula 3,456 B = allocated 3,456 B")


def test_pictures_and_widget(record):
    fig = draw_cache_view(cache_view(record, 5, 2, 1))
    assert len(fig.axes) == 3
    plt.close(fig)
    fig = plot_cache_bytes(range(6), [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6])
    plt.close(fig)
    w = build_cache_widget(record)
    step, info = w.children[0].children[0], w.children[2]
    assert info.value.startswith("step 0 (prefill): 4 positions")
    step.value = 5
    assert step.max == 5
    assert info.value.startswith("step 5 (decode): 9 positions") and "= allocated 5,184 B" in info.value


@pytest.mark.parametrize("kwargs, message", [
    (dict(step=6), "step must be"), (dict(step=0, layer=3), "layer must be"),
    (dict(step=0, head=-1), "head must be"), (dict(step=0, which="q"), "which must be"),
])
def test_bad_view_arguments(record, kwargs, message):
    with pytest.raises(InputError, match=message):
        cache_view(record, **kwargs)


def test_bad_record_arguments():
    m = random_model(CFG)
    with pytest.raises(InputError, match="one sequence"):
        record_decode(m, [[1, 2], [3, 4]], 2)
    with pytest.raises(InputError, match="n_new"):
        record_decode(m, [[1, 2]], 0)
    with pytest.raises(InputError, match="exceeds"):
        record_decode(m, [[1] * 30], 5)
