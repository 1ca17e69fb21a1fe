"""Draw the course's key figures into figures/ (PNG), from course_lib and the shipped tiny model.

    python scripts/make_figures.py            # every figure
    python scripts/make_figures.py --only abcd_masked_attention training_curve
    python scripts/make_figures.py --list

Nothing here is drawn by hand: each figure is a function of course_lib.viz applied to the model,
the tokenizer, the training record or a small worked example, so figures, notebooks and library
stay in sync.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib import parallel, perf  # noqa: E402
from course_lib.data import load_corpus, split_documents  # noqa: E402
from course_lib.model import Trace  # noqa: E402
from course_lib.tiny import load_tiny, training_record  # noqa: E402
from course_lib.viz import attention as va  # noqa: E402
from course_lib.viz.block import gpt_stack_figure, norm_placement_figure  # noqa: E402
from course_lib.viz import engine as ve  # noqa: E402
from course_lib.viz.embeddings import embedding_figure, position_similarity_figure  # noqa: E402
from course_lib.viz.heads import best_head, head_scores_figure, layer_weights, measure_heads, newline_ids  # noqa: E402
from course_lib.tiled import online_softmax_steps, split_kv_decode, tiled_causal_attention  # noqa: E402
from course_lib.viz.parallel import schedule_figure, schedules_figure, tp_sharding_figure, tp_split_figure  # noqa: E402
from course_lib.viz.tiles import OnlineSoftmaxFigure, draw_tile_grid, plot_skipped_fraction, plot_split_kv  # noqa: E402
from course_lib.viz.training import record_figure  # noqa: E402
from course_lib.widgets.parallel import pipeline_figure, pipeline_view  # noqa: E402
from course_lib.widgets.attention import attention_figure, attention_steps, attention_views  # noqa: E402

FIGURES = ROOT / "figures"
PROMPT = "The for statement is used to iterate over the elements of a list."
MULTILINE_PROMPT = "Return the length.\nA list is a sequence.\nThe for statement is used to iterate.\nThe"
# The seed article's four tokens, with small integer queries and keys (as in notebook 03).
ABCD_Q = [[1., 0, 1, 0], [0, 1, 0, 1], [1, 0, 2, 1], [0, 1, 1, 0]]
ABCD_K = [[1., 0, 1, 0], [0, 1, -1, 0], [0, 0, 1, -1], [1, 1, 1, 2]]

_cache: dict = {}


def tiny():
    if "tiny" not in _cache:
        _cache["tiny"] = load_tiny()
    return _cache["tiny"]


def trace_of(text: str):
    model, tok = tiny()
    ids = tok.encode(text)
    trace = Trace()
    with torch.no_grad():
        model(torch.tensor([ids]), trace=trace)
    return ids, tok.labels(ids), trace


def head_scores():
    if "heads" not in _cache:
        model, tok = tiny()
        _, val_docs = split_documents(load_corpus())
        ids = tok.encode("\n".join(val_docs)[:20000])
        _cache["heads"] = measure_heads(model, ids, marked_ids=newline_ids(tok), marked_name="newline tokens")[0]
    return _cache["heads"]


# --------------------------------------------------------------------------- one function per figure


def fig_embeddings():
    ids, labels, trace = trace_of("A list is a mutable sequence of items.")
    return embedding_figure(trace["embed.tok"][0], trace["embed.pos"], trace["embed.sum"][0], labels,
                            title="token + position embeddings → the input of block 0, one row per token")


def fig_position_similarity():
    model, _ = tiny()
    return position_similarity_figure(model.transformer.wpe.weight.detach(), n=model.config.n_positions,
                                      title="learned positions: neighbours are alike")


def fig_abcd_masked_attention():
    steps = attention_steps(torch.tensor(ABCD_Q), torch.tensor(ABCD_K))
    return va.steps_figure(steps, list("ABCD"), query_index=2,
                           suptitle="[A] [B] [C] [D]: token C's scores, the mask removes D, softmax per row")


def fig_scaling_sqrt_dk():
    gen = torch.Generator().manual_seed(0)
    dims = [4, 16, 64, 256, 1024]
    raw_std, scaled_std, raw_max, scaled_max = [], [], [], []
    for d in dims:
        s = (torch.randn(2000, 1, d, generator=gen) @ torch.randn(2000, 16, d, generator=gen).transpose(1, 2))[:, 0]
        for sc, std_, max_ in [(s, raw_std, raw_max), (s / math.sqrt(d), scaled_std, scaled_max)]:
            std_.append(float(sc.std()))
            max_.append(float(torch.softmax(sc, -1).max(-1).values.mean()))
    return va.scaling_figure(dims, raw_std, scaled_std, raw_max, scaled_max)


def fig_attention_steps_trained():
    model, tok = tiny()
    return attention_figure(attention_views(model, tok, PROMPT, query_index=7, layer=0, head=1))


def fig_heads_all_layers():
    model, _ = tiny()
    ids, labels, trace = trace_of(PROMPT)
    return va.layer_head_grid(layer_weights(trace, model.config.n_layer), labels,
                              title="attention weights of every head of the trained model")


def fig_head_scores():
    return head_scores_figure(head_scores(), title="what each head attends to (mean weight over held-out text)")


def fig_newline_head():
    layer, head = best_head(head_scores()["newline tokens"])
    ids, labels, trace = trace_of(MULTILINE_PROMPT)
    return va.head_grid(trace[f"h{layer}.attn.weights"][0], labels, highlight=head,
                        title=f"layer {layer}: head {head} (outlined) looks back to the start of the line (↵)")


def fig_pre_ln_block():
    return norm_placement_figure()


def fig_gpt_stack():
    c = tiny()[0].config
    return gpt_stack_figure(c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.n_positions)


def fig_training_curve():
    rec = training_record()
    return record_figure(rec, title=f"training the tiny GPT on the CPU: {rec['settings']['steps']} steps",
                         vocab_size=tiny()[0].config.vocab_size)


def fig_online_softmax_running_max():
    rng = np.random.default_rng(0)
    q = rng.normal(size=16)
    k, v = rng.normal(size=(48, 16)) * 1.5, rng.normal(size=(48, 16))
    k[29] += 2 * q                                     # the running maximum jumps in tile 4
    run = online_softmax_steps(q, k, v, 8)
    return OnlineSoftmaxFigure(run, step=3).fig


def fig_causal_tile_grid():
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(3, 128, 8))
    return draw_tile_grid(tiled_causal_attention(q, k, v, 16)[1], 16, 16, 128)


def fig_causal_skipped_fraction():
    rng = np.random.default_rng(0)
    lengths = [64, 128, 256, 512, 1024, 2048]
    fractions = [tiled_causal_attention(*rng.normal(size=(3, t, 4)), 64)[1].fraction_skipped for t in lengths]
    return plot_skipped_fraction(lengths, fractions, 64)


def fig_split_kv_decode():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 32))
    k = rng.normal(size=(8192, 2, 32)) * np.linspace(0.5, 1.5, 8192)[:, None, None]   # later keys score higher
    return plot_split_kv(split_kv_decode(q, k, rng.normal(size=(8192, 2, 32)), 1024), head=0)


def _engine_workload_record():
    """Notebook 11's paged-pool workload: a shared system prompt, late arrivals, a pool of 12 blocks."""
    from course_lib.engine import LLM, SamplingParams
    from course_lib.widgets.engine import Request, record_serving

    model, tok = tiny()
    greedy = lambda n: SamplingParams(max_tokens=n, ignore_eos=True)  # noqa: E731
    system = tok.encode("You are a helpful assistant. Answer every question in one short line of Python "
                        "documentation, with an example.")[:32]
    llm = LLM(model, tokenizer=tok, device="cpu", block_size=16, num_kv_blocks=12, max_num_batched_tokens=64,
              max_num_seqs=4, snapshot=True)
    return record_serving(llm, [Request(0, system + tok.encode(" What does a list do?"), greedy(30), "A"),
                                Request(0, tok.encode("import os"), greedy(20), "B"),
                                Request(3, system + tok.encode(" How does a for loop end?"), greedy(30), "C"),
                                Request(6, tok.encode("A dictionary maps keys to values. " * 3), greedy(24), "D"),
                                Request(12, tok.encode("def f(x):"), greedy(10), "E")])


def fig_engine_paged_pool():
    rec = _engine_workload_record()
    first_preemption = next(i for i, s in enumerate(rec.snapshots) if s.preempted)
    return ve.draw_pool(rec.snapshots, first_preemption, rec.block_size, rec.labels, rec.arrivals,
                        title="the engine's paged KV pool at its first preemption, above the scheduler's timeline")


def fig_engine_static_vs_continuous():
    from course_lib.engine import LLM, SamplingParams
    from course_lib.widgets.engine import static_batching

    model, tok = tiny()
    prompts = [tok.encode(t) for t in ["def f(x):", "The list", "import os", "A tuple is", "return the", "class A:",
                                       "while True:", "for i in"]]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in [60, 4, 6, 5, 8, 60, 4, 6]]
    llm = LLM(model, device="cpu", num_kv_blocks=64, max_num_seqs=4, snapshot=True)
    cont = llm.generate(prompts, params)
    cont_snaps = list(llm.snapshots)
    static = static_batching(llm, prompts, params, group_size=4)
    names = [f"r{i}" for i in range(len(prompts))]
    fig, axes = plt.subplots(2, 1, figsize=(8.6, 6.4))
    ve.draw_timeline(ve.request_timeline(static.snapshots, {o.request_id: n for o, n in zip(static.outputs, names)}),
                     axes[0], title=f"static batching, groups of 4: {len(static.snapshots)} steps", annotate=False)
    ve.draw_timeline(ve.request_timeline(cont_snaps, {o.request_id: n for o, n in zip(cont, names)}), axes[1],
                     title=f"continuous batching, up to 4 at a time: {len(cont_snaps)} steps", annotate=False)
    for ax in axes:
        ax.set_xlim(-0.5, len(static.snapshots) - 0.5)
    fig.tight_layout()
    return fig


def fig_tp_sharding():
    c = tiny()[0].config
    return tp_sharding_figure(c.n_head, 2)


def fig_pipeline_bubble_ideal():
    return pipeline_figure(pipeline_view(4, 8))


def _wide_spec():
    return parallel.ModelSpec.random(perf.bench_config("cpu"), seed=0)


def fig_tp_compute_vs_allreduce():
    """Tensor parallel over 2 CPU processes (gloo): compute vs all-reduce, tiny model and a wider one."""
    torch.set_num_threads(1)
    model, tok = tiny()
    ids = torch.tensor([tok.encode(PROMPT)])
    lengths = (16, 64, 128)
    narrow = parallel.run_tensor_parallel(parallel.ModelSpec.tiny(), ids, n_new=0, timing_lengths=lengths,
                                          allreduce_sizes=(4096, 4 << 20))
    wide = parallel.run_tensor_parallel(_wide_spec(), ids[:, :8], n_new=0, timing_lengths=lengths)
    timings = {f"D={model.config.n_embd}": narrow[0]["timing"], f"D={perf.bench_config('cpu').n_embd}": wide[0]["timing"]}
    return tp_split_figure(timings, narrow[0]["allreduce_bench"] + wide[0]["allreduce_bench"])


def fig_pipeline_schedule_measured():
    """Measured on this machine's CPU: two worker processes over gloo (a few seconds)."""
    torch.set_num_threads(1)
    batch = perf.random_ids(perf.bench_config("cpu"), 8, 32)
    runs = parallel.run_pipeline(_wide_spec(), batch, micro_counts=(1, 2, 4, 8), repeats=4)
    fig = schedules_figure(runs, 2, ideal=parallel.ideal_bubble)
    fig.suptitle(f"pipeline of 2 CPU processes (gloo), batch of 8 × 32 tokens; {perf.device_name('cpu')}", fontsize=9)
    fig.tight_layout()
    return fig


def fig_chunk_pipeline_measured():
    """One prompt of 256 tokens in 4 chunks over 2 stage processes, measured on this machine's CPU."""
    torch.set_num_threads(1)
    ids = perf.random_ids(perf.bench_config("cpu"), 1, 256)
    out = parallel.run_chunk_pipeline(_wide_spec(), ids, n_chunks=4, repeats=3)
    return schedule_figure(out["intervals"], 2, item="chunk",
                           title="one prompt of 256 tokens in 4 chunks: stage 1 works on chunk c while stage 0 works on c + 1")


FIGURE_FUNCTIONS = {name[4:]: fn for name, fn in sorted(globals().items()) if name.startswith("fig_")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="figure names (default: all)")
    ap.add_argument("--list", action="store_true", help="list the figure names and exit")
    ap.add_argument("--out", default=str(FIGURES), help="output directory")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(FIGURE_FUNCTIONS))
        return 0
    names = a.only or list(FIGURE_FUNCTIONS)
    unknown = [n for n in names if n not in FIGURE_FUNCTIONS]
    if unknown:
        ap.error(f"unknown figure(s) {unknown}; choose from {list(FIGURE_FUNCTIONS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        t0 = time.perf_counter()
        fig = FIGURE_FUNCTIONS[name]()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}  ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
