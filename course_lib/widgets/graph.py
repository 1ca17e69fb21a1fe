"""Pick a step of one token and see everything it waits for: the logic behind notebook 09's widget.

:func:`node_options` lists the steps the dropdown offers, :func:`waits_for` names the tokens
whose inputs a step needs, and :func:`build_graph_widget` wires a dropdown and a causal-mask
checkbox to :func:`course_lib.viz.graph.draw_layer_graph`: the graph is drawn once (with every
arrow of the unmasked graph) and a change only recolours arrows and boxes and hides the arrows
the mask removes. Tests call them without a browser.
Introduced in notebooks/09_parallel_and_sync.ipynb.
"""

from __future__ import annotations

from ..errors import InputError
from ..viz.graph import STAGE_LABELS, STAGES, LayerGraph, layer_graph


def node_options(tokens) -> list:
    """``(label, (stage, t))`` for every step above the input, stage by stage."""
    return [(f"{STAGE_LABELS[s]}[{tok}]", (s, t)) for s in STAGES[1:] for t, tok in enumerate(tokens)]


def waits_for(graph: LayerGraph, node) -> list:
    """The tokens whose input ``x`` the step ``node`` transitively needs, in order."""
    if node not in graph.nodes:
        raise InputError(f"{node!r} is not a (stage, token index) node of this graph")
    return [graph.tokens[t] for s, t in sorted(graph.ancestors(node)) if s == "x"]


def build_graph_widget(tokens, node=("ffn", 2), causal: bool = True):
    """A dropdown of steps and a causal-mask checkbox; the graph is drawn once and updated.

    Returns a VBox of ``[HBox(step, causal), info, image]``; the figure is ``box.fig`` and the
    callback ``box.redraw()`` (what a change runs)."""
    import ipywidgets as W

    from ..viz.graph import draw_layer_graph, update_layer_graph
    from .common import canvas_png, detach_figure, tight_bbox

    tokens = list(tokens)
    graphs = {c: layer_graph(tokens, causal=c) for c in (True, False)}
    options = node_options(tokens)
    if node not in [v for _, v in options]:
        raise InputError(f"node must be one of the steps above the input, e.g. ('ffn', 0); got {node!r}")
    step = W.Dropdown(options=options, value=node, description="step")
    mask = W.Checkbox(value=causal, description="causal mask")
    info = W.HTML()
    image = W.Image(format="png", layout=W.Layout(max_width="100%"))
    fig = detach_figure(draw_layer_graph(graphs[causal], highlight=node, arrows_of=graphs[False]))
    bbox = tight_bbox(fig)
    box = W.VBox([W.HBox([step, mask], layout=W.Layout(flex_flow="row wrap")), info, image])

    def redraw(*_):
        graph = graphs[mask.value]
        info.value = f"waits for the inputs of: {waits_for(graph, step.value)}"
        update_layer_graph(fig, graph, highlight=step.value)
        image.value = canvas_png(fig, 80, bbox)

    for w in (step, mask):
        w.observe(redraw, names="value")
    redraw()
    box.fig, box.redraw = fig, redraw
    return box
