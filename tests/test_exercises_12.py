"""The exercise checks of notebook 12: wrong answers raise, the solutions pass, None is 'not answered'."""

import math

import pytest

from course_lib.exercises import nb12_flash_attention as ex
from course_lib.tiled import SoftmaxState, merge_states


def test_none_is_not_answered(capsys):
    for check in (ex.check_rescale, ex.check_merge, ex.check_tiles_computed):
        check(None)
        assert capsys.readouterr().out.strip() == "not answered yet"


@pytest.mark.parametrize("wrong", [1.0, math.exp(3), -0.5, math.exp(-2), "0.05"])
def test_rescale_wrong(wrong):
    with pytest.raises(AssertionError):
        ex.check_rescale(wrong)


def _forgets_rescale(a, b):
    return SoftmaxState(max(a.m, b.m), a.l + b.l, a.acc + b.acc, a.keys_seen + b.keys_seen)


def _takes_first_max(a, b):
    w = math.exp(b.m - a.m)
    return SoftmaxState(a.m, a.l + b.l * w, a.acc + b.acc * w, a.keys_seen + b.keys_seen)


@pytest.mark.parametrize("wrong", [_forgets_rescale, _takes_first_max, lambda a, b: a,
                                   lambda a, b: (a.m, a.l, a.acc)])
def test_merge_wrong(wrong):
    with pytest.raises(AssertionError):
        ex.check_merge(wrong)


@pytest.mark.parametrize("wrong", [64, 8, 28, 32, 37, 36.0])
def test_tiles_wrong(wrong):
    with pytest.raises(AssertionError):
        ex.check_tiles_computed(wrong)


def test_solutions(capsys):
    ex.check_rescale(math.exp(2.0 - 5.0))
    ex.check_merge(merge_states)
    ex.check_tiles_computed(8 * 9 // 2)
    assert capsys.readouterr().out.split() == ["correct"] * 3


def test_hints_never_show_the_answer():
    for wrong, check, answer in ((0.5, ex.check_rescale, f"{math.exp(-3):.3}"), (30, ex.check_tiles_computed, "36")):
        with pytest.raises(AssertionError) as e:
            check(wrong)
        assert answer not in str(e.value)
