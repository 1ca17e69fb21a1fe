"""Pictures of the engine's glass box: timeline states, pool views, memory series, figures."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from course_lib.engine.metrics import StepRecord  # noqa: E402
from course_lib.engine.snapshot import StepSnapshot  # noqa: E402
from course_lib.errors import InputError  # noqa: E402
from course_lib.viz import engine as ve  # noqa: E402

BS = 4


def snap(step, scheduled, tables, preempted=(), finished=(), hits=None, free=0, blocks=6):
    sched = [{"request_id": r, "num_tokens": n, "start": s, "kind": k} for r, n, s, k in scheduled]
    return StepSnapshot(step=step, scheduled=sched, prefix_hits=hits or {}, preempted=list(preempted),
                        block_tables=tables, input_ids=[], positions=[], slot_mapping=[], query_start=[0],
                        context_lens=[], logits_indices=[], sampled={}, num_free_blocks=free, num_blocks=blocks,
                        finished=list(finished), seconds=0.01)


# a hand-made run: "a" prefills 6 tokens, "b" arrives at step 1 and reuses a's first block, "b" is
# preempted at step 2 while "a" decodes, "a" finishes at step 3, "b" is recomputed at step 4
SNAPS = [
    snap(10, [("a", 6, 0, "prefill")], {"a": [1, 2]}),
    snap(11, [("a", 1, 6, "decode"), ("b", 2, 4, "prefill")], {"a": [1, 2], "b": [1, 3]}, hits={"b": 4}),
    snap(12, [("a", 1, 7, "decode")], {"a": [1, 2]}, preempted=["b"]),
    snap(13, [("a", 1, 8, "decode")], {}, finished=["a"]),
    snap(14, [("b", 7, 0, "prefill")], {"b": [4, 5]}),
    snap(15, [("b", 1, 7, "decode")], {}, finished=["b"]),
]


def test_timeline_states_of_the_hand_made_run():
    tl = ve.request_timeline(SNAPS, labels={"a": "A", "b": "B"}, arrivals={"b": 11})
    assert tl.request_ids == ["a", "b"] and tl.labels == ["A", "B"] and tl.steps == list(range(10, 16))
    assert tl.row("a") == ["prefill", "decode", "decode", "decode", "", ""]
    assert tl.row("b") == ["", "prefill", "preempted", "waiting", "recompute", "decode"]
    assert tl.tokens[1].tolist() == [0, 2, 0, 0, 7, 1]
    assert tl.count("decode") == 4 and tl.count("preempted") == 1


def test_timeline_waiting_and_stalled():
    snaps = [snap(0, [("a", 4, 0, "prefill")], {"a": [1]}),
             snap(1, [("b", 4, 0, "prefill")], {"a": [1, 2], "b": [3]})]   # a holds blocks, got no tokens
    tl = ve.request_timeline(snaps)                                         # b arrived at the start
    assert tl.row("a") == ["prefill", "stalled"] and tl.row("b") == ["waiting", "prefill"]
    assert tl.labels == ["req a", "req b"]


def test_pool_view_owners_fill_and_sharing():
    v = ve.pool_view(SNAPS, 1, BS)
    assert v.owners[1] == ["a", "b"] and v.owners[2] == ["a"] and v.owners[3] == ["b"] and v.owners[4] == []
    assert v.cached_tokens == {"a": 7, "b": 6}
    assert v.filled[1].all() and v.filled[2].tolist() == [True, True, True, False]
    assert v.filled[3].tolist() == [True, True, False, False]
    assert v.held_blocks == 3 and v.shared_blocks == 1
    assert v.filled_slots == 4 + 3 + 2 and v.empty_reserved_slots == 3 * BS - 9
    after_preempt = ve.pool_view(SNAPS, 2, BS)
    assert after_preempt.cached_tokens == {"a": 8} and after_preempt.owners[3] == []
    assert ve.pool_view(SNAPS, 3, BS).held_blocks == 0


def test_pool_rgb_colours():
    v = ve.pool_view(SNAPS, 1, BS)
    colours = ve.request_colours(["a", "b"])
    img = ve.pool_rgb(v, colours, blocks_per_row=4)                    # 7 blocks (null + 6) -> 2 rows
    assert img.shape == (2, 4 * BS, 3)
    assert np.allclose(img[0, :BS], ve.NULL_RGB)                       # block 0
    assert np.allclose(img[0, 2 * BS], colours["a"])                   # block 2, slot 0: filled
    assert not np.allclose(img[0, 3 * BS - 1], colours["a"])           # block 2, slot 3: pale
    assert np.allclose(img[1, 0], ve.FREE_RGB)                         # block 4: free
    assert len(set(ve.request_colours(list("abcdefghijkl")).values())) == 12
    assert not set(ve.request_colours(list("abcdefghijkl")).values()) & {matplotlib.colors.to_rgb(c) for c in ve.STATE_COLOURS.values()}


def test_summary_and_memory_series():
    line = ve.pool_summary(ve.pool_view(SNAPS, 1, BS), {"a": "A", "b": "B"})
    assert line.startswith("step 1: 3 of 6 blocks held (1 shared), 3 empty slots")
    assert "prefix hit B 4 tokens" in line and "A [1, 2] · B [1, 3]" in line
    mem = ve.memory_series(SNAPS, BS, {"a": 9, "b": 8})
    assert mem["held"].tolist() == [8, 12, 8, 0, 8, 0]
    assert mem["filled"].tolist() == [6, 9, 8, 0, 7, 0]
    assert mem["contiguous"].tolist() == [9, 17, 9, 0, 8, 0]
    with pytest.raises(InputError, match="no maximum length"):
        ve.memory_series(SNAPS, BS, {"a": 9})


def test_pool_figure_updates_in_place():
    pf = ve.PoolFigure(SNAPS, BS, {"a": "A", "b": "B"})
    before = pf.image.get_array().copy()
    view = pf.show(4)
    assert view.block_tables == {"b": [4, 5]}
    assert not np.allclose(before, pf.image.get_array())
    assert pf.cursor.get_xdata()[0] == 4
    assert pf.share_marks[1].get_visible() is False
    pf.show(1)
    assert pf.share_marks[1].get_visible() and pf.block_text[1].get_text() == "1 ×2"
    plt.close(pf.fig)


def test_figures_draw():
    for fig in (ve.draw_pool(SNAPS, 1, BS), ve.draw_timeline(ve.request_timeline(SNAPS), cursor=2),
                ve.draw_memory(ve.memory_series(SNAPS, BS, {"a": 9, "b": 8}), 64, pool_slots=24)):
        assert fig.axes
        plt.close(fig)
    recs = [StepRecord(i, 1, p, d, 1, 10**6 * (p + d), 10**6, 0.01, 0.1, 0.2) for i, (p, d) in enumerate([(6, 0), (0, 1)])]
    fig = ve.draw_ledger(recs)
    assert len(fig.axes) == 4 and len(fig.axes[3].lines) == 2
    plt.close(fig)
    fig = ve.draw_budget_tradeoff({16: {"ttft": 0.1, "itl": 0.01}, 64: {"ttft": 0.03, "itl": 0.02}}, highlight=16)
    plt.close(fig)


@pytest.mark.parametrize("call, message", [
    (lambda: ve.request_timeline(None), "snapshot=True"),
    (lambda: ve.request_timeline([]), "empty"),
    (lambda: ve.pool_view(SNAPS, 6, BS), "index must be in 0..5"),
    (lambda: ve.pool_view(SNAPS, 0, 0), "block_size"),
    (lambda: ve.pool_view([snap(0, [], {"a": [9]})], 0, BS), "outside the pool"),
    (lambda: ve.draw_ledger([]), "ledger is empty"),
    (lambda: ve.draw_budget_tradeoff({}), "no runs"),
])
def test_bad_input(call, message):
    with pytest.raises(InputError, match=message):
        call()


def test_make_figures_draws_the_engine_figures(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "make_figures.py"
    spec = importlib.util.spec_from_file_location("make_figures", path)
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    names = ["engine_paged_pool", "engine_static_vs_continuous"]
    assert mf.main(["--out", str(tmp_path), "--only", *names]) == 0
    for n in names:
        data = (tmp_path / f"{n}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
