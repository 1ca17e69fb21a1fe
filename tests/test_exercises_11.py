"""Notebook 11's exercise checks: a wrong answer fails with a hint that hides the value, the solution passes."""

import pytest

from course_lib.engine import LLM, SamplingParams
from course_lib.exercises import nb11_inside_an_engine as ex


@pytest.fixture(scope="module")
def model():
    return LLM("tiny", device="cpu").model


@pytest.fixture(scope="module")
def snapshots(model):
    llm = LLM(model, device="cpu", block_size=4, num_kv_blocks=12, snapshot=True)
    llm.generate([[5, 6, 7, 8, 9, 10, 11], [12, 13]], SamplingParams(max_tokens=6, ignore_eos=True))
    return llm.snapshots


def right_slot(table, pos, bs):
    return table[pos // bs] * bs + pos % bs


def test_slot_of(snapshots, capsys):
    ex.check_slot_of(None, snapshots, 4)
    assert capsys.readouterr().out == "not answered yet\n"
    ex.check_slot_of(lambda t, p, bs: None, snapshots, 4)
    assert capsys.readouterr().out == "not answered yet\n"
    for wrong in (lambda t, p, bs: t[p // bs] + p % bs,            # forgot to scale by the block size
                  lambda t, p, bs: p,                               # as if contiguous
                  lambda t, p, bs: t[0] * bs + p):                  # first block only
        with pytest.raises(AssertionError, match="is not where the engine wrote it"):
            ex.check_slot_of(wrong, snapshots, 4)
    ex.check_slot_of(right_slot, snapshots, 4)
    assert capsys.readouterr().out == "correct\n"


def test_cached_tokens(model, capsys):
    served = list(range(1, 51))
    new = served[:40] + list(range(100, 130))
    ex.check_cached_tokens(None, LLM(model, device="cpu"), served, new)
    assert capsys.readouterr().out == "not answered yet\n"
    for wrong, hint in ((40, "whole blocks"), (48, "more than"), (16, "less than"), (-1, "whole number"), (3.5, "whole number")):
        with pytest.raises(AssertionError, match=hint) as e:
            ex.check_cached_tokens(wrong, LLM(model, device="cpu"), served, new)
        assert "32" not in str(e.value)
    ex.check_cached_tokens(32, LLM(model, device="cpu"), served, new)
    assert capsys.readouterr().out == "correct\n"


def test_idle_slots(model, capsys):
    llm = LLM(model, device="cpu", snapshot=True)
    prompts = [[3, 4], [5, 6], [7], [8, 9], [10]]
    lens = [6, 2, 3, 5, 4]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lens]
    ex.check_idle_slots(None, llm, prompts, params, 2)
    assert capsys.readouterr().out == "not answered yet\n"
    for wrong in (0, 5, True, -2):                        # right: (6-2) + (5-3) + 0 = 6
        with pytest.raises(AssertionError) as e:
            ex.check_idle_slots(wrong, llm, prompts, params, 2)
        assert " 6 " not in str(e.value)
    ex.check_idle_slots(6, llm, prompts, params, 2)
    assert capsys.readouterr().out == "correct\n"
