"""The dependency graph of one transformer layer, token by token, and who waits for whom.

Nodes are (stage, token) pairs; an edge ``a → b`` means ``b`` cannot be computed before ``a``.
Edges that stay inside one token's column cost nothing to parallelise; edges that cross
columns are the synchronisation points: the scores of token i need the keys of the other
tokens, the weighted sum needs their values. Under the causal mask token i needs only tokens
``j <= i``. The graph is built here from the attention rule, then
notebooks/09_parallel_and_sync.ipynb checks every edge against the live model by perturbation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from ..errors import InputError

#: The stages of one layer, bottom to top, and whether they only use their own token.
STAGES = ("x", "q", "k", "v", "scores", "softmax", "aggregate", "ffn")
STAGE_LABELS = {"x": "input x", "q": "Q", "k": "K", "v": "V", "scores": "scores q·kᵀ",
                "softmax": "softmax", "aggregate": "weights @ V", "ffn": "W_o + FFN"}
#: Trace names (layer ``{i}``) whose row ``t`` holds a stage's value for token ``t``.
TRACE_NAMES = {"x": None, "q": "h{i}.attn.q", "k": "h{i}.attn.k", "v": "h{i}.attn.v",
               "scores": "h{i}.attn.scores", "softmax": "h{i}.attn.weights",
               "aggregate": "h{i}.attn.head_out", "ffn": "h{i}.resid_out"}


@dataclass
class LayerGraph:
    tokens: list
    causal: bool
    nodes: list = field(default_factory=list)          # (stage, t)
    edges: list = field(default_factory=list)          # ((stage, t), (stage, t), is_sync)

    def parents(self, node):
        return [a for a, b, _ in self.edges if b == node]

    def ancestors(self, node) -> set:
        """Every node ``node`` transitively waits for."""
        seen, stack = set(), [node]
        while stack:
            for p in self.parents(stack.pop()):
                if p not in seen:
                    seen.add(p)
                    stack.append(p)
        return seen

    def depends_on_tokens(self, stage: str) -> list[list[bool]]:
        """``m[i][j]``: does ``(stage, i)`` depend on the input of token ``j``? (T×T)."""
        T = len(self.tokens)
        out = []
        for i in range(T):
            anc = self.ancestors((stage, i)) | {(stage, i)}
            out.append([("x", j) in anc for j in range(T)])
        return out

    def sync_edges(self):
        return [(a, b) for a, b, s in self.edges if s]


def layer_graph(tokens, causal: bool = True) -> LayerGraph:
    """Build the graph of one layer for ``tokens`` (e.g. ``["A", "B", "C", "D"]``).

    Without ``causal`` every query waits for every key (what a model without a mask, like BERT, needs);
    with it, query ``i`` waits for keys and values ``0..i`` only.
    """
    tokens = list(tokens)
    if not tokens:
        raise InputError("layer_graph needs at least one token")
    T = len(tokens)
    g = LayerGraph(tokens=tokens, causal=causal)
    g.nodes = [(s, t) for s in STAGES for t in range(T)]

    def add(a, b):
        g.edges.append((a, b, a[1] != b[1]))

    for t in range(T):
        for s in ("q", "k", "v"):
            add(("x", t), (s, t))                        # own token only: free
        add(("q", t), ("scores", t))
        for j in range(T):
            if j <= t or not causal:
                add(("k", j), ("scores", t))              # sync: needs other tokens' keys
        add(("scores", t), ("softmax", t))                # the whole row of scores
        add(("softmax", t), ("aggregate", t))
        for j in range(T):
            if j <= t or not causal:
                add(("v", j), ("aggregate", t))           # sync: needs other tokens' values
        add(("aggregate", t), ("ffn", t))
        add(("x", t), ("ffn", t))                         # the residual
    return g


def _edge_style(sync: bool, on_path: bool, highlighted: bool):
    """Colour, line width and alpha of one arrow: orange on the highlighted node's path."""
    color = "tab:orange" if on_path else ("tab:red" if sync else "0.55")
    return color, (1.4 if on_path else 0.8), (0.9 if (on_path or not highlighted) else 0.35)


def _node_face(node, anc: set, highlight) -> str:
    return "tab:orange" if node in anc else ("gold" if node == highlight else "white")


def _default_title(graph: LayerGraph) -> str:
    mode = "causal" if graph.causal else "no mask"
    return f"one layer, {mode}: grey = own token only, red = waits for other tokens"


def draw_layer_graph(graph: LayerGraph, ax=None, highlight: tuple | None = None, title: str | None = None,
                     arrows_of: LayerGraph | None = None):
    """Columns are tokens, rows are stages; grey arrows stay in a column, red arrows cross.

    ``highlight=(stage, t)`` draws that node's ancestors in orange: everything it waits for.
    The arrows and boxes are kept in ``ax.course_handles`` (and ``fig.course_handles``) for
    :func:`update_layer_graph`. ``arrows_of`` (a graph of the same tokens with at least
    ``graph``'s edges, e.g. the unmasked one) draws its arrows and hides those ``graph`` lacks,
    so that the same figure can later show either graph.
    """
    T = len(graph.tokens)
    arrows_of = arrows_of or graph
    if arrows_of.tokens != graph.tokens:
        raise InputError("arrows_of must be a graph of the same tokens as graph")
    if ax is None:
        fig, ax = plt.subplots(figsize=(2.0 * T + 1.0, 5.2))
    else:
        fig = ax.figure
    row = {"x": 0, "q": 1, "k": 1, "v": 1, "scores": 2, "softmax": 3, "aggregate": 4, "ffn": 5}
    dx = {"q": -0.55, "k": 0.0, "v": 0.55}
    pos = {(s, t): (t * 2.0 + dx.get(s, 0.0), row[s] * 1.0) for s in STAGES for t in range(T)}
    arrows = {}
    for a, b, sync in arrows_of.edges:
        if a[0] == "x" and b[0] == "ffn":
            continue  # the residual x → FFN output: in the graph, not drawn (it would hide the column)
        (x0, y0), (x1, y1) = pos[a], pos[b]
        rad = 0.0 if not sync else 0.12
        arrows[(a, b)] = ax.add_patch(FancyArrowPatch((x0, y0 + 0.17), (x1, y1 - 0.17), arrowstyle="-|>",
                                                      mutation_scale=8, connectionstyle=f"arc3,rad={rad}"))
    short = {"x": "x", "q": "Q", "k": "K", "v": "V"}
    boxes = {}
    for (s, t), (x, y) in pos.items():
        label = f"{short[s]}[{graph.tokens[t]}]" if s in short else f"{STAGE_LABELS[s]}[{graph.tokens[t]}]"
        boxes[(s, t)] = ax.text(x, y, label, ha="center", va="center", fontsize=7.5,
                                bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="0.3", lw=0.8))
    ax.set_xlim(-1.0, (T - 1) * 2.0 + 1.0)
    ax.set_ylim(-0.5, 5.5)
    ax.axis("off")
    handles = {"arrows": arrows, "boxes": boxes, "title": ax.set_title("", fontsize=9),
               "tokens": list(graph.tokens)}
    ax.course_handles = fig.course_handles = handles
    update_layer_graph(ax, graph, highlight, title)
    return fig


def update_layer_graph(ax, graph: LayerGraph, highlight: tuple | None = None, title: str | None = None):
    """Show ``graph`` with ``highlight`` in an axes (or a one-graph figure) that
    :func:`draw_layer_graph` drew: arrow colours and visibility, box face colours, the title."""
    h = getattr(ax, "course_handles", None)
    if h is None:
        raise InputError("update_layer_graph needs a figure or axes drawn by draw_layer_graph")
    if graph.tokens != h["tokens"]:
        raise InputError("this graph has other tokens than the figure shows; draw a new one")
    if highlight is not None and highlight not in h["boxes"]:
        raise InputError(f"highlight must be a (stage, token index) node of the graph, got {highlight!r}")
    edges = {(a, b): sync for a, b, sync in graph.edges if not (a[0] == "x" and b[0] == "ffn")}
    missing = set(edges) - set(h["arrows"])
    if missing:
        raise InputError(f"the figure has no arrows for {len(missing)} edges of this graph; draw it with "
                         f"arrows_of= the graph with the most edges (causal=False)")
    anc = graph.ancestors(highlight) if highlight else set()
    for (a, b), arrow in h["arrows"].items():
        arrow.set_visible((a, b) in edges)
        if (a, b) in edges:
            on_path = a in anc and (b in anc or b == highlight)
            color, lw, alpha = _edge_style(edges[(a, b)], on_path, bool(highlight))
            arrow.set_color(color)
            arrow.set_linewidth(lw)
            arrow.set_alpha(alpha)
    for node, box in h["boxes"].items():
        box.get_bbox_patch().set_facecolor(_node_face(node, anc, highlight))
    h["title"].set_text(title or _default_title(graph))
    return ax if isinstance(ax, Figure) else ax.figure
