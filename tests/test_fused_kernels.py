"""The fused kernels (triton_fused.py), the decode GEMV (triton_gemv.py), the greedy argmax
(triton_argmax.py) and the fused forward (fused_forward.py) on CPU: kernels through the Triton
interpreter against torch, the engine's greedy outputs with fused kernels on vs off, and the
host-side decisions (plans, config).

Interpreted checks run in a fresh process (TRITON_INTERPRET=1 must be set before the kernels are
defined). The GPU side, timing included, is benchmarks/bench_kernels.py.
"""

import pytest
from conftest import run_interpreted

from course_lib.errors import ConfigError

KERNELS = r"""
import torch
import torch.nn.functional as F
from course_lib.engine.triton_gemv import GemvConfig, default_config, gemv, gemv_partials, splitk_reduce
from course_lib.engine.triton_fused import add_layernorm, bias_gelu, embed_layernorm
from course_lib.errors import InputError

torch.manual_seed(0)

def close(got, ref, dtype, what):
    # fp32: exact up to summation order; bf16: the output's rounding (2^-8 of the largest value)
    err = (got.float() - ref.float()).abs().max().item()
    tol = 2e-5 * max(1.0, ref.abs().max().item()) if dtype == torch.float32 else 1.6e-2 * ref.abs().max().item()
    assert err <= tol, (what, err, tol)

# shapes not multiples of any block, both weight layouts, rows 1..8 and 20 (two row tiles)
n = 0
for dtype in (torch.float32, torch.bfloat16):
    for K, N in ((100, 70), (130, 257)):
        for M in (1, 3, 8, 20):
            x = torch.randn(M, K, dtype=dtype)
            w = (torch.randn(K, N) / K ** 0.5).to(dtype)
            b = torch.randn(N, dtype=dtype)
            ref = x.float() @ w.float()
            configs = [GemvConfig(block_n=32, block_k=32, split=1, use_dot=M > 1),     # one launch, epilogue
                       GemvConfig(block_n=64, block_k=32, split=3, use_dot=False),     # split-K + reduce
                       GemvConfig(block_n=32, block_k=64, split=2, use_dot=True), None,   # None: the default rule
                       GemvConfig(block_n=64, block_k=32, split=-(-K // 32), use_dot=M > 1)]   # one trip a program
            for i, cfg in enumerate(configs):
                close(gemv(x, w, config=cfg), ref, dtype, ("no bias", K, N, M, cfg))
                gelu = i < 2 or i == 4
                close(gemv(x, w, b, gelu=gelu, config=cfg), F.gelu(ref + b.float(), approximate="tanh")
                      if gelu else ref + b.float(), dtype, ("bias (+gelu)", K, N, M, cfg))
                n += 2
            wt = (torch.randn(N, K) / K ** 0.5).to(dtype)            # the LM head's layout: (K, N) view, K contiguous
            close(gemv(x, wt.t()), x.float() @ wt.float().t(), dtype, ("k-contiguous", K, N, M))
            cfg = configs[1]
            parts = gemv_partials(x, w, cfg)
            assert parts.shape == (cfg.num_splits(K), M, N) and parts.dtype == torch.float32
            close(parts.sum(0), ref, torch.float32 if dtype == torch.float32 else dtype, ("partials", K, N, M))
            close(splitk_reduce(parts, b, gelu=True, dtype=dtype), F.gelu(ref + b.float(), approximate="tanh"),
                  dtype, ("reduce", K, N, M))
            out = torch.full((M, N), float("nan"), dtype=dtype)
            assert gemv(x, w, b, out=out, config=cfg) is out and not out.isnan().any()
            n += 3
# 32-row blocks of token rows on the tensor cores: one block (20 rows), two blocks (40 rows)
for dtype in (torch.float32, torch.bfloat16):
    K, N = 130, 257
    w, b = (torch.randn(K, N) / K ** 0.5).to(dtype), torch.randn(N, dtype=dtype)
    cfg = GemvConfig(block_n=32, block_k=32, split=2, use_dot=True, block_m=32, num_stages=2)
    for M in (20, 40):
        x = torch.randn(M, K, dtype=dtype)
        close(gemv(x, w, b, config=cfg), x.float() @ w.float() + b.float(), dtype, ("32-row blocks", M, dtype))
        n += 1
for bad in (lambda: gemv(torch.randn(2, 5), torch.randn(6, 3)), lambda: gemv(torch.randn(5, 4).t(), torch.randn(5, 3)),
            lambda: gemv(torch.randn(2, 5), torch.randn(5, 3), out=torch.empty(3, 2)),
            lambda: gemv(torch.randn(2, 5), torch.randn(5, 3), config=GemvConfig(use_dot=True, block_m=24))):
    try:
        bad()
        raise SystemExit("bad gemv input accepted")
    except InputError:
        pass
print("gemv ok", n)

# the row kernel: K-contiguous weights (W.T row-major), whole rows a program, at most ROWS_MAX_M rows
from course_lib.engine.triton_gemv import ROWS_MAX_M, RowsConfig, plan_gemv, rows_config
for dtype in (torch.float32, torch.bfloat16):
    for K, N in ((100, 70), (130, 257)):
        wt = (torch.randn(N, K) / K ** 0.5).to(dtype)
        w = wt.t()                                                  # (K, N) view, K contiguous
        b = torch.randn(N, dtype=dtype)
        for M in range(1, ROWS_MAX_M + 1):
            x = torch.randn(M, K, dtype=dtype)
            ref = x.float() @ w.float()
            for cfg in (RowsConfig(block_n=8, split=1, num_warps=4), RowsConfig(block_n=16, split=3, num_warps=4),
                        plan_gemv(M, K, N, k_contiguous=True)):
                assert isinstance(cfg, RowsConfig), cfg
                close(gemv(x, w, config=cfg), ref, dtype, ("rows", K, N, M, cfg))
                close(gemv(x, w, b, gelu=True, config=cfg), F.gelu(ref + b.float(), approximate="tanh"), dtype,
                      ("rows bias + gelu", K, N, M, cfg))
                parts = gemv_partials(x, w, cfg)
                assert parts.shape == (cfg.num_splits(K), M, N) and parts.dtype == torch.float32
                close(parts.sum(0), ref, torch.float32 if dtype == torch.float32 else dtype, ("rows partials", K, N, M))
                n += 3
for bad in (lambda: gemv(torch.randn(ROWS_MAX_M + 1, 8), torch.randn(5, 8).t(), config=rows_config(8, 5)),
            lambda: gemv(torch.randn(1, 8), torch.randn(8, 5), config=rows_config(8, 5))):   # N-contiguous
    try:
        bad()
        raise SystemExit("bad row-kernel input accepted")
    except InputError:
        pass
# the row kernel on the tensor cores: any rows (tiles of 16-64), at least 16 columns a program
for dtype in (torch.float32, torch.bfloat16):
    K, N = 130, 70
    w = (torch.randn(N, K) / K ** 0.5).to(dtype).t()
    b = torch.randn(N, dtype=dtype)
    for M in (1, 3, 20):
        x = torch.randn(M, K, dtype=dtype)
        ref = x.float() @ w.float()
        for cfg in (RowsConfig(block_n=16, split=1, use_dot=True), RowsConfig(block_n=32, split=2, use_dot=True)):
            close(gemv(x, w, b, gelu=True, config=cfg), F.gelu(ref + b.float(), approximate="tanh"), dtype,
                  ("rows dot", K, N, M, cfg))
            close(gemv_partials(x, w, cfg).sum(0), ref, torch.float32 if dtype == torch.float32 else dtype,
                  ("rows dot partials", K, N, M, cfg))
            n += 2
try:
    gemv(torch.randn(3, 8), torch.randn(5, 8).t(), config=RowsConfig(block_n=8, use_dot=True))
    raise SystemExit("a tensor-core row launch of fewer than 16 columns accepted")
except InputError:
    pass
print("rows ok", n)

# the row kernel with its neighbours folded in (gemv_fused): the LayerNorm of its input rows, the
# residual add, the K/V write into the paged pool; on the CUDA cores (1-2 rows) and tensor cores
from course_lib.engine.triton_gemv import KVWrite, gemv_fused
for dtype in (torch.float32, torch.bfloat16):
    for M, K, cfg in ((1, 48, RowsConfig(block_n=16)), (2, 100, RowsConfig(block_n=64)),
                      (5, 48, RowsConfig(block_n=16, use_dot=True)), (20, 100, RowsConfig(block_n=32, use_dot=True))):
        H, Dh, bs, blocks = 2, 8, 4, 6
        row = H * Dh
        N = 3 * row + 5                       # q, k, v and a few columns past them
        x = torch.randn(M, K, dtype=dtype)
        w = (torch.randn(N, K) / K ** 0.5).to(dtype).t()
        b = torch.randn(N, dtype=dtype)
        ln = torch.nn.LayerNorm(K, dtype=dtype)
        ln.weight.data.normal_(); ln.bias.data.normal_()
        # the LayerNorm only on the CUDA cores (one or two rows); the tensor-core path takes h itself
        norm = None if cfg.use_dot else ln
        h = F.layer_norm(x.float(), (K,), ln.weight.float(), ln.bias.float(), ln.eps).to(dtype)
        x_in = h if cfg.use_dot else x
        h = h.float()
        close(gemv_fused(x_in, w, b, cfg, ln=norm, gelu=True), F.gelu(h @ w.float() + b.float(), approximate="tanh"),
              dtype, ("fused ln + gelu", M, K, cfg))
        res = torch.randn(M, N, dtype=dtype)
        close(gemv_fused(x, w, b, cfg, residual=res), res.float() + (x.float() @ w.float() + b.float()), dtype,
              ("fused residual", M, K, cfg))
        k_pool, v_pool = torch.zeros(blocks, bs, H, Dh, dtype=dtype), torch.zeros(blocks, bs, H, Dh, dtype=dtype)
        slots = torch.randperm(blocks * bs)[:M]
        y = gemv_fused(x_in, w, b, cfg, ln=norm, kv_write=KVWrite(k_pool, v_pool, slots, start=row))
        close(y, h @ w.float() + b.float(), dtype, ("fused ln + kv write", M, K, cfg))
        assert torch.equal(k_pool.view(-1, row)[slots], y[:, row:2 * row]), ("keys written", M, cfg)
        assert torch.equal(v_pool.view(-1, row)[slots], y[:, 2 * row:3 * row]), ("values written", M, cfg)
        others = torch.ones(blocks * bs, dtype=torch.bool)
        others[slots] = False
        assert not k_pool.view(-1, row)[others].any() and not v_pool.view(-1, row)[others].any(), "other slots written"
        n += 3
x, w = torch.randn(1, 64), torch.randn(8, 64).t()
for bad in (lambda: gemv_fused(x, w, None, RowsConfig(block_n=8, split=2), ln=torch.nn.LayerNorm(64)),   # K split
            lambda: gemv_fused(x, w, None, RowsConfig(block_n=16, use_dot=True), ln=torch.nn.LayerNorm(64)),
            lambda: gemv_fused(x, w, None, RowsConfig(block_n=8), residual=torch.randn(2, 8)),
            lambda: gemv_fused(x, w, None, RowsConfig(block_n=8),
                               kv_write=KVWrite(torch.zeros(2, 4, 1, 4), torch.zeros(2, 4, 1, 4), torch.zeros(1, dtype=torch.long), 6))):
    try:
        bad()
        raise SystemExit("bad gemv_fused input accepted")
    except InputError:
        pass
print("fused rows ok", n)

for dtype in (torch.float32, torch.bfloat16):
    for D, rows in ((48, 5), (100, 3)):                          # D = 100: not a power of two
        ln = torch.nn.LayerNorm(D, dtype=dtype)
        with torch.no_grad():
            ln.weight.normal_(), ln.bias.normal_()
        lnf = lambda t: F.layer_norm(t.float(), (D,), ln.weight.float(), ln.bias.float())   # noqa: E731
        x = torch.randn(rows, D, dtype=dtype)
        d = torch.randn(rows, D, dtype=dtype)
        parts, db = torch.randn(4, rows, D), torch.randn(D, dtype=dtype)
        x_new, h = add_layernorm(x, ln, d)
        close(x_new, x + d, dtype, "x + d")
        close(h, lnf(x + d), dtype, "ln(x + d)")
        x_new, h = add_layernorm(x, ln, parts, db)                # split-K partials summed, bias added
        want = (x.float() + parts.sum(0) + db.float()).to(dtype)
        close(x_new, want, dtype, "x + partials + bias")
        close(h, lnf(want), dtype, "ln(x + partials + bias)")
        sel = torch.tensor([rows - 1, 0, rows - 1])
        none, h = add_layernorm(x, ln, d, db, rows=sel)           # the logit rows only, LayerNorm only
        assert none is None and h.shape == (3, D)
        close(h, lnf((x + (d.float() + db.float()).to(dtype))[sel]), dtype, "gathered rows")
        same, h = add_layernorm(x, ln)                            # no delta: a plain LayerNorm
        assert same is x, "without a delta the residual stream is x itself, not a copy"
        close(h, lnf(x), dtype, "plain LayerNorm")
        wte, wpe = torch.randn(30, D, dtype=dtype), torch.randn(20, D, dtype=dtype)
        ids, pos = torch.randint(0, 30, (rows,)), torch.randint(0, 20, (rows,))
        x_e, h_e = embed_layernorm(ids, pos, wte, wpe, ln)
        close(x_e, wte[ids] + wpe[pos], dtype, "embed")          # (the interpreter rounds bf16 its own way)
        close(h_e, lnf(wte[ids] + wpe[pos]), dtype, "embed + ln")
        # rows fed on the device (async scheduling): feed_rows > 0 takes fed[feed_rows - 1], not the id
        fed = torch.tensor([29, 3, 17, 8, 22])
        feed = torch.zeros(rows, dtype=torch.long)
        feed[::2] = torch.arange(1, rows + 1)[::2] % 5 + 1
        ids_f = torch.where(feed > 0, fed[(feed - 1).clamp(min=0)], ids)
        assert not torch.equal(ids_f, ids)
        x_f, h_f = embed_layernorm(ids, pos, wte, wpe, ln, feed_rows=feed, fed_tokens=fed)
        close(x_f, wte[ids_f] + wpe[pos], dtype, "embed, fed rows")
        close(h_f, lnf(wte[ids_f] + wpe[pos]), dtype, "embed + ln, fed rows")
        y, b = torch.randn(rows, 3 * D + 7, dtype=dtype), torch.randn(3 * D + 7, dtype=dtype)
        close(bias_gelu(y, b), F.gelu(y.float() + b.float(), approximate="tanh"), dtype, "bias + gelu")
for bad in (lambda: add_layernorm(torch.randn(3, 8), torch.nn.LayerNorm(8), torch.randn(2, 8)),
            lambda: bias_gelu(torch.randn(3, 8), torch.randn(7)),
            lambda: embed_layernorm(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                                    torch.randn(4, 8), torch.randn(4, 8), torch.nn.LayerNorm(8),
                                    feed_rows=torch.zeros(3, dtype=torch.long))):
    try:
        bad()
        raise SystemExit("bad input accepted")
    except InputError:
        pass
print("fused ok")
"""

ENGINE = r"""
import torch
from course_lib.engine import LLM, SamplingParams
from course_lib.engine import triton_fused
from course_lib.tiny import load_tiny

model, tok = load_tiny()
base = tok.encode("The for statement is used to iterate over the elements")[:20]
prompts = [tok.encode(t) for t in ("def ", "Return the", "The while statement", "import os\n")]
prompts += [base + tok.encode(" of a"), base + [17], base[:13]]
p = SamplingParams(max_tokens=6, ignore_eos=True)
kw = dict(device="cpu", block_size=4, attention="triton", max_num_batched_tokens=24, num_kv_blocks=40)
want = [o.token_ids for o in LLM(model, fused_kernels=False, **kw).generate(prompts, p)]
llm = LLM(model, fused_kernels=True, **kw)
assert llm.engine.runner.fused is not None
assert [o.token_ids for o in llm.generate(prompts, p)] == want
plans = llm.engine.runner.fused._plans
assert any(v is None for v in plans.values()), "a prefill step should have used cuBLAS (many rows)"
assert [o.token_ids for o in llm.generate(prompts[:1], p)] == want[:1]      # decode steps of one row
from course_lib.engine.triton_gemv import RowsConfig
assert any(isinstance(v, RowsConfig) for v in plans.values()), "a decode step should have used the row kernel"
assert all(b.mlp.c_fc.weight.stride(0) == 1 for b in llm.engine.runner.model.transformer.h)   # stored K-contiguous
print("fused engine ok", len(plans))

# teeth: a LayerNorm that forgets its bias changes the outputs
orig = triton_fused.add_layernorm
def broken(x, ln, *a, **k):
    class NoBias:
        weight, bias, eps = ln.weight, torch.zeros_like(ln.bias), ln.eps
    return orig(x, NoBias, *a, **k)
import course_lib.engine.fused_forward as ff
ff.add_layernorm = broken
got = [o.token_ids for o in LLM(model, fused_kernels=True, **kw).generate(prompts, p)]
assert got != want
ff.add_layernorm = orig

# teeth for the one-row decode layer: a QKV product that forgets its fused K/V write leaves the
# pool without the decoded tokens' keys, and the one-row decode goes wrong
fused = ff.gemv_fused
calls = []
def no_kv_write(*a, kv_write=None, **k):
    calls.append(kv_write is not None)
    return fused(*a, **k)
ff.gemv_fused = no_kv_write
got = [o.token_ids for o in LLM(model, fused_kernels=True, **kw).generate(prompts[:1], p)]
assert any(calls) and got != want[:1]
print("sabotage caught")
"""

TENSOR_PARALLEL = r"""
from course_lib.engine import LLM, SamplingParams
from course_lib.tiny import load_tiny

if __name__ == "__main__":
    model, tok = load_tiny()
    prompts = [tok.encode(t) for t in ("def ", "Return the")]
    p = SamplingParams(max_tokens=4, ignore_eos=True)
    want = [o.token_ids for o in LLM(model, device="cpu", block_size=4).generate(prompts, p)]
    llm = LLM(model, device="cpu", block_size=4, attention="triton", fused_kernels=True, tensor_parallel_size=2,
              num_kv_blocks=40, max_num_batched_tokens=16)
    assert llm.engine.runner.fused is not None
    assert [o.token_ids for o in llm.generate(prompts, p)] == want
    llm.shutdown()
    print("tensor parallel fused ok")
"""


ARGMAX = r"""
import torch
from course_lib.engine.triton_argmax import ArgmaxRows, BLOCK
from course_lib.errors import InputError

torch.manual_seed(0)
am = ArgmaxRows(8, "cpu")
n = 0
for dtype in (torch.float32, torch.bfloat16):
    for V in (1, 100, BLOCK, BLOCK + 1, 3 * BLOCK - 5):
        for S, live in ((1, 1), (5, 5), (6, 3)):
            x = torch.randn(S, V).to(dtype)
            if V > 10:
                x[0, 7] = x[0].max()                       # a tie: the first column wins
                x[0, V - 1] = x[0].max()
            if S > 1 and V > 10:
                x[1, V // 2] = float("nan")                # NaN is the largest
                x[1, 3] = float("nan")
                x[2] = float("-inf")                       # all -inf: column 0
                x[3] = -1.0                                # negatives: the one larger, late in the row
                x[3, V - 2] = -0.5
                x[4] = -1.0
                x[4, 0], x[4, 5] = -0.0, 0.0               # -0.0 == 0.0: the first column wins
            out = torch.full((S,), -7, dtype=torch.int64)
            for rep in range(2):                           # the scratch is reset for the next launch
                out.fill_(-7)
                am(x, torch.tensor([live]), out)
                ref = x[:live].argmax(-1)
                assert torch.equal(out[:live], ref), (dtype, V, S, rep, out, ref)
                assert (out[live:] == -7).all(), "rows past num_rows were written"
                n += 1
# a strided view with contiguous rows (the graph's logits buffer cut to V columns)
buf = torch.randn(4, 300)
out = torch.empty(4, dtype=torch.int64)
am(buf[:, :257], torch.tensor([4]), out)
assert torch.equal(out, buf[:, :257].argmax(-1))
for bad in (lambda: am(torch.randn(9, 10), torch.tensor([1]), torch.empty(9, dtype=torch.int64)),
            lambda: am(torch.randn(10, 4).t(), torch.tensor([1]), torch.empty(4, dtype=torch.int64)),
            lambda: am(torch.randn(2, 10), torch.tensor([1]), torch.empty(2, dtype=torch.int32)),
            lambda: am(torch.randn(2, 10), torch.tensor(1), torch.empty(2, dtype=torch.int64))):
    try:
        bad()
    except InputError:
        pass
    else:
        raise AssertionError("bad input was accepted")
print("argmax ok", n)
"""



def test_gemv_and_fused_kernels_match_torch_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted(KERNELS, "fused ok")


def test_engine_greedy_equal_with_fused_kernels_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted(ENGINE, "sabotage caught")


def test_tensor_parallel_with_fused_kernels_in_interpreter():
    """Two ranks: each projection completed and all-reduced before the fused add + LayerNorm."""
    pytest.importorskip("triton")
    run_interpreted(TENSOR_PARALLEL, "tensor parallel fused ok")


def test_argmax_rows_equals_torch_argmax_in_interpreter():
    """The step graphs' greedy argmax (triton_argmax.py): torch.argmax's exact answer — the first
    of equal logits, NaN above all, -0.0 equal to 0.0 — on rows of many chunks, only for the live
    rows, and again on a second launch (the scratch it keeps is reset)."""
    pytest.importorskip("triton")
    run_interpreted(ARGMAX, "argmax ok")


# ---------------------------------------------------------------------- host side, no kernels run
def test_plan_gemv_rules(monkeypatch):
    pytest.importorskip("triton")
    from course_lib.engine import triton_gemv as G

    measured = dict(G.MEASURED)
    monkeypatch.setattr(G, "MEASURED", {})                   # the rules for shapes never measured
    c = G.plan_gemv(1, 6400, 1600)               # XL's narrow MLP projection: split-K fills the SMs
    assert c is not None and c.split > 1 and not c.use_dot
    assert c.num_splits(6400) * c.k_per_split(6400) >= 6400 > (c.num_splits(6400) - 1) * c.k_per_split(6400)
    assert c.k_per_split(6400) % c.block_k == 0 and c.k_per_split(6400) >= G.MIN_K_PER_SPLIT
    n_blocks = -(-1600 // c.block_n)
    assert n_blocks * c.num_splits(6400) >= G.TARGET_PROGRAMS * 0.75
    assert G.plan_gemv(8, 1600, 4800).use_dot                   # several rows: tensor cores
    assert G.plan_gemv(1, 1600, 50257, k_contiguous=True).split == 1   # 50k columns are enough programs
    assert G.plan_gemv(G.DEFAULT_MAX_ROWS + 1, 1600, 4800) is None     # many rows: cuBLAS
    G.MEASURED[(1600, 4800, False, 1)] = None                   # a measured table entry wins
    assert G.plan_gemv(1, 1600, 4800) is None
    lm8 = G.GemvConfig(block_n=64, block_k=64, split=1, num_warps=4, use_dot=True)
    G.MEASURED[(1600, 50257, True, 8)] = lm8
    G.MEASURED[(1600, 50257, True, 32)] = None
    assert G.plan_gemv(5, 1600, 50257, k_contiguous=True) == lm8     # the nearest measured M above
    assert G.plan_gemv(9, 1600, 50257, k_contiguous=True) is None
    # the shipped table: measured entries only, every value a config or None (cuBLAS)
    assert measured and all(v is None or isinstance(v, (G.GemvConfig, G.RowsConfig)) for v in measured.values())
    # K-contiguous weights (the engine's layout) at up to ROWS_MAX_M rows: the row kernel, with the
    # widest of 8, 4, 2 columns a program that still leaves ROWS_TARGET_PROGRAMS programs
    assert G.plan_gemv(1, 1600, 4800, k_contiguous=True) == G.RowsConfig(block_n=8, split=1, num_warps=4)
    assert G.plan_gemv(G.ROWS_MAX_M, 768, 2304, k_contiguous=True) == G.RowsConfig(block_n=4)
    assert G.plan_gemv(1, 1600, 1600, k_contiguous=True).block_n == 2          # 1600 columns: 2 a program
    assert G.plan_gemv(1, 1600, 50257, k_contiguous=True).block_n == 8         # the LM head too
    assert not isinstance(G.plan_gemv(G.ROWS_MAX_M + 1, 768, 2304, k_contiguous=True), G.RowsConfig)
    for K, N in ((768, 768), (1600, 4800), (6400, 1600), (768, 50257)):
        c = G.rows_config(K, N)
        assert -(-N // c.block_n) >= G.ROWS_TARGET_PROGRAMS or c.block_n == 2
    monkeypatch.setattr(G, "MEASURED", measured)              # the shipped table, at 3-32 rows
    assert G.plan_gemv(4, 1600, 4800, k_contiguous=True) is None                 # XL's wide projections: cuBLAS
    assert G.plan_gemv(32, 1600, 6400, k_contiguous=True) is None
    assert G.plan_gemv(3, 768, 2304, k_contiguous=True).use_dot                  # 124M's: rows on tensor cores
    assert isinstance(G.plan_gemv(32, 768, 3072, k_contiguous=True), G.RowsConfig)
    assert isinstance(G.plan_gemv(8, 1600, G.GPT2_HEAD, k_contiguous=True), G.GemvConfig)   # the padded LM head: tiles
    assert G.plan_gemv(32, 1600, G.GPT2_HEAD, k_contiguous=True) is None                  # ... and cuBLAS at 32 rows
    assert G.plan_gemv(32, 6400, 1600, k_contiguous=True).block_m == 32                   # one 32-row block
    assert isinstance(G.plan_gemv(33, 768, 2304, k_contiguous=True), G.RowsConfig)   # measured at 64 rows
    assert G.plan_gemv(33, 1600, 1600, k_contiguous=True) is None                # not measured past 32: cuBLAS
    assert G.plan_gemv(G.GEMV_MAX_ROWS + 1, 768, 2304, k_contiguous=True) is None


def test_measured_gemv_table_holds_only_products_the_engine_runs():
    """Every entry of the measured table is a product of GPT-2 124M or XL as the engine runs it:
    a layer's four projections and the LM head at its padded width (an entry for the unpadded
    50,257 would never be looked up)."""
    pytest.importorskip("triton")
    from course_lib.engine import triton_gemv as G
    from course_lib.engine.fused_forward import padded_vocab

    assert G.GPT2_HEAD == padded_vocab(50257)
    shapes = {(D, n) for D in (768, 1600) for n in (3 * D, D, 4 * D, padded_vocab(50257))}
    shapes |= {(4 * D, D) for D in (768, 1600)}
    assert {(K, N) for K, N, _, _ in G.MEASURED} <= shapes, {(K, N) for K, N, _, _ in G.MEASURED} - shapes
    assert all(c for _, _, c, _ in G.MEASURED)                   # the engine's K-contiguous layout
    assert all(m <= G.GEMV_MAX_ROWS for _, _, _, m in G.MEASURED)


def test_fused_kernels_config():
    from course_lib.engine import LLM
    from course_lib.engine.config import EngineConfig
    from course_lib.tiny import load_tiny

    with pytest.raises(ConfigError, match="fused_kernels must be True or False"):
        EngineConfig(fused_kernels="yes")
    with pytest.raises(ConfigError, match="fused_kernels=True runs Triton kernels"):
        LLM("tiny", device="cpu", attention="torch", fused_kernels=True)
    model, _ = load_tiny()
    resolved = EngineConfig(device="cpu").resolve(model.config)
    assert resolved.fused_kernels is False                      # off on CPU by default...
    assert LLM(model, device="cpu").engine.runner.fused is None  # ...and unused
