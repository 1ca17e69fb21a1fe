"""course_lib.tiled: online softmax, tiled causal attention and its counts, split-KV, RoPE."""

import math

import numpy as np
import pytest

from course_lib.errors import InputError
from course_lib.tiled import (SoftmaxState, fold_tile, merge_states, naive_attention, online_softmax_steps,
                              rope_attention, rope_rotate, softmax, split_kv_decode, tiled_causal_attention)

rng = np.random.default_rng(0)


def qkv(T, Dh=8, scale=1.0):
    return rng.normal(size=(3, T, Dh)) * scale


def test_softmax_and_naive_attention():
    x = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, -np.inf]])
    assert np.allclose(softmax(x), [np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum(), [0.5, 0.5, 0]])
    q, k, v = qkv(5)
    out = naive_attention(q, k, v)
    assert np.allclose(out[0], v[0])                                  # row 0 sees only key 0
    s = q[3] @ k[:4].T / math.sqrt(8)
    assert np.allclose(out[3], softmax(s) @ v[:4])
    assert np.allclose(naive_attention(q[-2:], k, v)[1], out[-1])     # the last rows of a longer context


@pytest.mark.parametrize("S, tile", [(1, 1), (37, 5), (64, 16), (64, 64), (10, 100)])
def test_online_softmax_equals_softmax(S, tile):
    q = rng.normal(size=8)
    k, v = rng.normal(size=(2, S, 8)) * 3
    run = online_softmax_steps(q, k, v, tile)
    assert run.n_tiles == -(-S // tile) == len(run.states) == len(run.alphas)
    full = softmax(k @ q / math.sqrt(8))
    assert np.allclose(run.states[-1].output, full @ v)
    for st, (a, b) in zip(run.states, run.bounds):                   # every prefix is a valid attention
        assert st.keys_seen == b
        assert math.isclose(st.m, run.scores[:b].max())
        assert np.allclose(st.output, softmax(run.scores[:b]) @ v[:b])
    assert run.alphas[0] == 0.0                                       # the empty start contributes nothing
    assert all(0 <= a <= 1 for a in run.alphas)


def test_fold_tile_rescales_only_when_the_max_grows():
    st = fold_tile(SoftmaxState.empty(2), np.array([1.0, 2.0]), np.eye(2))[0]
    st2, alpha = fold_tile(st, np.array([0.5]), np.array([[1.0, 1.0]]))
    assert alpha == 1.0 and st2.m == 2.0
    st3, alpha = fold_tile(st, np.array([5.0]), np.array([[1.0, 1.0]]))
    assert math.isclose(alpha, math.exp(-3)) and st3.m == 5.0
    assert math.isclose(st3.l, st.l * math.exp(-3) + 1.0)


def test_merge_states_is_the_softmax_over_both():
    q = rng.normal(size=4)
    k, v = rng.normal(size=(2, 30, 4)) * 2
    s = k @ q / 2
    a = fold_tile(SoftmaxState.empty(4), s[:11], v[:11])[0]
    b = fold_tile(SoftmaxState.empty(4), s[11:], v[11:])[0]
    for m in (merge_states(a, b), merge_states(b, a)):
        assert np.allclose(m.output, softmax(s) @ v) and m.keys_seen == 30 and m.m == s.max()
    assert np.allclose(merge_states(a, SoftmaxState.empty(4)).output, a.output)   # the empty state is neutral


@pytest.mark.parametrize("T, tq, tk", [(1, 4, None), (33, 8, None), (64, 16, 16), (50, 7, 12), (40, 16, 5)])
def test_tiled_causal_equals_naive(T, tq, tk):
    q, k, v = qkv(T, scale=2)
    out, c = tiled_causal_attention(q, k, v, tq, tk)
    assert np.allclose(out, naive_attention(q, k, v), atol=1e-12)
    tk = tq if tk is None else tk
    # the grid from the loop against the geometry: skipped iff the key tile starts after the query tile ends
    for i in range(c.grid.shape[0]):
        for j in range(c.grid.shape[1]):
            r0, r1, c0, c1 = i * tq, min((i + 1) * tq, T) - 1, j * tk, min((j + 1) * tk, T) - 1
            assert c.grid[i, j] == (0 if c0 > r1 else 2 if c1 > r0 else 1)
    assert c.largest_scores <= tq * tk
    assert c.macs_needed <= c.macs_done <= c.macs_full
    done = sum(2 * Dh_rows for Dh_rows in [
        (min((i + 1) * tq, T) - i * tq) * (min((j + 1) * tk, T) - j * tk) * 8
        for i in range(c.grid.shape[0]) for j in range(c.grid.shape[1]) if c.grid[i, j]])
    assert c.macs_done == done


def test_non_causal_tiles_compute_everything():
    q, k, v = qkv(24)
    out, c = tiled_causal_attention(q, k, v, 8, causal=False)
    assert np.allclose(out, naive_attention(q, k, v, causal=False))
    assert c.pairs_skipped == 0 and c.pairs_masked == 0 and c.fraction_skipped == 0


def test_skipped_fraction_tends_to_one_half():
    fr = []
    for T in (64, 256, 1024):
        q, k, v = qkv(T, Dh=2)
        c = tiled_causal_attention(q, k, v, 32)[1]
        n = T // 32
        assert c.pairs_done == n * (n + 1) // 2 and c.pairs_masked == n
        fr.append(c.fraction_skipped)
    assert fr == sorted(fr) and abs(fr[-1] - 0.5) < 0.02
    assert math.isclose(fr[-1], (32 - 1) / (2 * 32))


def test_split_kv_equals_unsplit():
    H, S, Dh = 3, 300, 8
    q = rng.normal(size=(H, Dh))
    k, v = rng.normal(size=(2, S, H, Dh)) * 2
    for split in (1, 64, 100, 300, 1000):
        sd = split_kv_decode(q, k, v, split)
        for h in range(H):
            assert np.allclose(sd.output[h], naive_attention(q[h:h + 1], k[:, h], v[:, h], causal=False)[0])
        assert len(sd.ranges) == -(-S // split) and sd.work_items == H * len(sd.ranges)
        assert [p.keys_seen for p in sd.partials[0]] == [b - a for a, b in sd.ranges]


def test_rope_rotation_properties():
    x = rng.normal(size=(6, 8))
    pos = np.arange(6)
    r = rope_rotate(x, pos)
    assert np.allclose(np.linalg.norm(r, axis=1), np.linalg.norm(x, axis=1))    # a rotation
    assert np.allclose(rope_rotate(x, np.zeros(6)), x)
    assert np.allclose(rope_rotate(r, -pos), x)                                  # rotating back
    q, k = rng.normal(size=(2, 1, 8))
    dots = [(rope_rotate(q, [m + 3]) @ rope_rotate(k, [m]).T).item() for m in (0, 5, 40)]
    assert np.allclose(dots, dots[0])                                            # relative only
    assert not np.isclose((rope_rotate(q, [3]) @ rope_rotate(k, [0]).T).item(),
                          (rope_rotate(q, [4]) @ rope_rotate(k, [0]).T).item())


def test_rope_cache_of_rotated_keys_extends_exactly():
    T, Dh = 9, 8
    q, k, v = qkv(T + 1, Dh)
    pos = np.arange(T + 1)
    full = rope_attention(q, k, v, pos)
    cached_k = rope_rotate(k[:T], pos[:T])                         # what the cache stores
    new_k = rope_rotate(k[T:], pos[T:])
    q_new = rope_rotate(q[T:], pos[T:])
    step = naive_attention(q_new, np.vstack([cached_k, new_k]), v, causal=True)
    assert np.allclose(step[0], full[-1])


@pytest.mark.parametrize("call, message", [
    (lambda: naive_attention(np.zeros((2, 4)), np.zeros((3, 5)), np.zeros((3, 5))), "head dimension"),
    (lambda: naive_attention(np.zeros((2, 4)), np.zeros((3, 4)), np.zeros((2, 4))), "same shape"),
    (lambda: naive_attention(np.zeros(4), np.zeros((3, 4)), np.zeros((3, 4))), "2-D"),
    (lambda: tiled_causal_attention(np.zeros((0, 4)), np.zeros((0, 4)), np.zeros((0, 4)), 2), "empty"),
    (lambda: tiled_causal_attention(np.zeros((3, 4)), np.zeros((3, 4)), np.zeros((3, 4)), 0), "tile_q"),
    (lambda: tiled_causal_attention(np.zeros((3, 4)), np.zeros((5, 4)), np.zeros((5, 4)), 2), "as many keys"),
    (lambda: online_softmax_steps(np.zeros(4), np.zeros((3, 4)), np.zeros((3, 4)), 1.5), "tile"),
    (lambda: online_softmax_steps(np.zeros(4), np.zeros((3, 5)), np.zeros((3, 5)), 2), "need k, v"),
    (lambda: split_kv_decode(np.zeros((2, 4)), np.zeros((8, 3, 4)), np.zeros((8, 3, 4)), 2), "need k, v"),
    (lambda: split_kv_decode(np.zeros((2, 4)), np.zeros((8, 2, 4)), np.zeros((8, 2, 4)), True), "split"),
    (lambda: rope_rotate(np.zeros((2, 5)), [0, 1]), "even"),
    (lambda: rope_rotate(np.zeros((2, 4)), [0, 1, 2]), "one position per row"),
])
def test_bad_input(call, message):
    with pytest.raises(InputError, match=message):
        call()
