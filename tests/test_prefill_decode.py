import pytest
"""Claims of notebooks 07-09 that go beyond tests/test_invariants.py, on random configs."""

import itertools

import torch
from conftest import random_model

from course_lib import perf
from course_lib.model import Trace


def test_later_token_leaves_earlier_rows_bit_identical(random_config):
    m = random_model(random_config)
    T = min(6, random_config.n_positions)
    idx = torch.randint(0, random_config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    other = idx.clone()
    other[:, -1] = (other[:, -1] + 1) % random_config.vocab_size
    a, b = Trace(), Trace()
    with torch.no_grad():
        m(idx, trace=a)
        m(other, trace=b)
    for name in a.keys():
        if name.endswith(("attn.mask", "embed.pos")):
            continue
        x, y = a[name], b[name]
        if name.endswith(("attn.scores", "attn.scaled")):
            x, y = x[..., :T - 1], y[..., :T - 1]        # the raw future column does change (N5)
        axis = 2 if x.dim() == 4 else 1
        assert torch.equal(x.narrow(axis, 0, T - 1), y.narrow(axis, 0, T - 1)), name


def test_only_the_serial_layer_order_reproduces_the_model(random_config):
    if random_config.n_layer < 2:
        pytest.skip("one layer has no order to get wrong")
    m = random_model(random_config)
    idx = torch.randint(0, random_config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    tr = Trace()
    with torch.no_grad():
        m(idx, trace=tr)
        target = tr[f"h{random_config.n_layer - 1}.resid_out"]
        good = []
        for order in itertools.permutations(range(random_config.n_layer)):
            x = tr["embed.sum"]
            for i in order:
                x = m.transformer.h[i](x)
            if torch.allclose(x, target, atol=1e-5):
                good.append(order)
    assert good == [tuple(range(random_config.n_layer))]


def test_prefill_logits_last_row_and_lm_head_waste(random_config):
    m = random_model(random_config)
    T = min(7, random_config.n_positions)
    idx = torch.randint(0, random_config.vocab_size, (3, T), generator=torch.Generator().manual_seed(3))
    logits, cache = m.prefill(idx)
    assert logits.shape == (3, random_config.vocab_size)
    c = random_config
    every = perf.prefill_cost(c, T, batch=3, logits="all")
    last = perf.prefill_cost(c, T, batch=3, logits="last")
    assert every.total_flops - last.total_flops == 2 * c.n_embd * c.vocab_size * 3 * (T - 1)
    assert cache.nbytes() == last.bytes["kv_write"]       # what prefill writes is exactly the cache
