"""Exercise checks of notebooks/12_flash_attention.ipynb.

Each check prints "not answered yet" for ``None``, raises :class:`AssertionError` with a hint that
says what is wrong (never the expected value), and prints "correct" when the answer is right.
"""

from __future__ import annotations

import math

import numpy as np

from ..tiled import SoftmaxState, fold_tile, naive_attention, tiled_causal_attention

#: Exercise 1: the running maximum before a tile, and the largest score inside that tile.
RESCALE_M_OLD, RESCALE_TILE_MAX = 2.0, 5.0
#: Exercise 3: the sequence length and the (square) tile size.
TILES_T, TILES_TILE = 1024, 128


def _unanswered(answer) -> bool:
    if answer is None:
        print("not answered yet")
        return True
    return False


def check_rescale(factor) -> None:
    """Exercise 1: the factor by which the running sum and output are multiplied."""
    if _unanswered(factor):
        return
    assert isinstance(factor, (int, float, np.floating)), "give one number (a float)"
    want = math.exp(RESCALE_M_OLD - max(RESCALE_M_OLD, RESCALE_TILE_MAX))
    if math.isclose(factor, 1 / want, rel_tol=1e-6):
        raise AssertionError("upside down: the old terms were measured against a smaller maximum, "
                             "so against the new one they shrink")
    assert factor > 0, "exp of anything is positive"
    assert factor < 1, "the maximum grew, so the old terms shrink: the factor is below 1"
    assert math.isclose(factor, want, rel_tol=1e-6), \
        "not quite: the factor is exp of (old maximum − new maximum), and the new maximum is the larger one"
    print("correct")


def _split_states(rng, S=40, Dh=6, cut=17):
    q = rng.normal(size=Dh)
    k, v = rng.normal(size=(S, Dh)) * 2, rng.normal(size=(S, Dh))
    s = k @ q / math.sqrt(Dh)
    a = fold_tile(SoftmaxState.empty(Dh), s[:cut], v[:cut])[0]
    b = fold_tile(SoftmaxState.empty(Dh), s[cut:], v[cut:])[0]
    return a, b, naive_attention(q[None], k, v, causal=False)[0]


def check_merge(merge) -> None:
    """Exercise 2: ``merge(a, b)`` of two :class:`SoftmaxState` over disjoint key ranges."""
    if _unanswered(merge):
        return
    rng = np.random.default_rng(12)
    for trial in range(5):
        a, b, want = _split_states(rng, cut=5 + 7 * trial)
        got = merge(a, b)
        if got is None:
            print("not answered yet")
            return
        assert isinstance(got, SoftmaxState), "return a SoftmaxState(m, l, acc, keys_seen)"
        assert math.isclose(got.m, max(a.m, b.m)), "m of the merge must be the larger of the two maxima"
        assert got.keys_seen == a.keys_seen + b.keys_seen, "keys_seen must count the keys of both parts"
        assert np.allclose(got.acc / got.l, want, atol=1e-9), \
            "acc / l differs from softmax over both ranges: rescale each part's l and acc to the common maximum"
        swapped = merge(b, a)
        assert np.allclose(swapped.acc / swapped.l, want, atol=1e-9), "merge(b, a) must equal merge(a, b)"
    print("correct")


def check_tiles_computed(n) -> None:
    """Exercise 3: tile pairs a causal tiled kernel computes for ``TILES_T`` and ``TILES_TILE``."""
    if _unanswered(n):
        return
    assert isinstance(n, (int, np.integer)), "give a whole number of tile pairs"
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(3, TILES_T, 2))
    counts = tiled_causal_attention(q, k, v, TILES_TILE)[1]
    per_side = -(-TILES_T // TILES_TILE)
    assert n != per_side * per_side, "that is every tile pair: a causal kernel skips some"
    assert n != counts.pairs_masked, "that counts only the diagonal tiles; the ones below it are computed too"
    assert n != counts.pairs_done - counts.pairs_masked, "the diagonal tiles are computed too (with the mask)"
    assert n == counts.pairs_done, \
        "count the pairs on and below the diagonal: a pair is skipped only when all its keys come after all its queries"
    print("correct")
