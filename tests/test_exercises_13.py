"""Exercise checks of notebook 13: a wrong answer raises AssertionError, the solution prints 'correct'."""

import pytest

from course_lib.exercises import nb13_many_devices as ex
from course_lib.tiny import load_tiny


@pytest.fixture(scope="module")
def model():
    return load_tiny()[0]


def test_allreduce_bytes(model, capsys):
    D, L = model.config.n_embd, model.config.n_layer
    ex.check_allreduce_bytes(None, None, model)
    assert capsys.readouterr().out.strip() == "not answered yet"
    for wrong in ((50 * D * 4, 2 * L), (2 * 50 * D * 2, 2 * L), (2 * 50 * D * 4, L), (2 * 50 * D * 4, 2 * L + 1)):
        with pytest.raises(AssertionError):
            ex.check_allreduce_bytes(*wrong, model)
    with pytest.raises(AssertionError):
        ex.check_allreduce_bytes(1.5, 8, model)
    ex.check_allreduce_bytes(2 * 50 * D * 4, 2 * L, model)
    assert capsys.readouterr().out.strip() == "correct"


def test_bubble(capsys):
    ex.check_bubble(None)
    assert capsys.readouterr().out.strip() == "not answered yet"
    for wrong in (3 / 12, 0.25, 1 / 15, 1.5, "0.2"):
        with pytest.raises(AssertionError):
            ex.check_bubble(wrong)
    ex.check_bubble(3 / 15)
    assert capsys.readouterr().out.strip() == "correct"
    ex.check_bubble(1 / 5, n_stages=2, n_micro=4)
    assert capsys.readouterr().out.strip() == "correct"


def _good(W_fc, b_fc, W_proj, rank, n):
    f = W_fc.shape[1] // n
    s = slice(rank * f, (rank + 1) * f)
    return W_fc[:, s], b_fc[s], W_proj[s]


def test_shard_mlp(capsys):
    ex.check_shard_mlp(None)
    assert capsys.readouterr().out.strip() == "not answered yet"
    ex.check_shard_mlp(lambda *a: None)
    assert capsys.readouterr().out.strip() == "not answered yet"

    def rows_of_fc(W_fc, b_fc, W_proj, rank, n):          # splits the wrong axis of W_fc
        d = W_fc.shape[0] // n
        return W_fc[rank * d:(rank + 1) * d], b_fc, W_proj

    def mismatched(W_fc, b_fc, W_proj, rank, n):          # W_proj rows of another rank
        a, b, _ = _good(W_fc, b_fc, W_proj, rank, n)
        return a, b, _good(W_fc, b_fc, W_proj, (rank + 1) % n, n)[2]

    def everything(W_fc, b_fc, W_proj, rank, n):           # every rank holds all of it
        return W_fc, b_fc, W_proj

    for wrong in (rows_of_fc, mismatched, everything):
        with pytest.raises(AssertionError):
            ex.check_shard_mlp(wrong)
    ex.check_shard_mlp(_good)
    assert capsys.readouterr().out.strip() == "correct"
