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
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib import parallel, perf  # noqa: E402
from course_lib.data import load_corpus, split_documents  # noqa: E402
from course_lib.model import Trace  # noqa: E402
from course_lib.tiny import load_tiny, training_record  # noqa: E402
from course_lib.viz import attention as va  # noqa: E402
from course_lib.viz.block import gpt_stack_figure, norm_placement_figure  # noqa: E402
from course_lib.viz.embeddings import embedding_figure, position_similarity_figure  # noqa: E402
from course_lib.viz.parallel import schedule_figure, schedules_figure, tp_sharding_figure, tp_split_figure  # noqa: E402
from course_lib.viz.heads import best_head, head_scores_figure, layer_weights, measure_heads, newline_ids  # noqa: E402
from course_lib.viz.training import record_figure  # noqa: E402
from course_lib.widgets.attention import attention_figure, attention_steps, attention_views  # noqa: E402
from course_lib.widgets.parallel import pipeline_figure, pipeline_view  # noqa: E402

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
