"""Notebook 01's widget: type text, see its tokens, ids and the embeddings they become.

Introduced in notebooks/01_tokens_and_embeddings.ipynb.
"""

from __future__ import annotations

import torch

from ..model import Trace
from ..viz.embeddings import embedding_figure
from .attention import _prompt_box
from .common import Explorer, figure_png, prompt_ids


@torch.no_grad()
def embedding_views(model, tokenizer, prompt: str) -> dict:
    """ids, labels and the three (T, D) matrices: token embeddings, position embeddings, their sum."""
    ids = prompt_ids(tokenizer, prompt, model.config.n_positions)
    trace = Trace()
    model(torch.tensor([ids], device=model.transformer.wte.weight.device), trace=trace)
    return {"ids": ids, "labels": tokenizer.labels(ids), "tokens": tokenizer.tokens(ids),
            "tok": trace["embed.tok"][0].cpu(), "pos": trace["embed.pos"].cpu(), "sum": trace["embed.sum"][0].cpu()}


def embedding_summary(views: dict) -> str:
    rows = [f"{i:>3}  id {t_id:>4}  {tok!r}" for i, (t_id, tok) in enumerate(zip(views["ids"], views["tokens"]))]
    T, D = views["sum"].shape
    return f"{T} tokens → input of shape (1, {T}, {D})\n" + "\n".join(rows)


class EmbeddingExplorer(Explorer):
    """A prompt box; shows the tokens with their ids and the embedding heatmaps."""

    def __init__(self, model, tokenizer, prompt: str = "A list is a mutable sequence."):
        self.model, self.tokenizer = model, tokenizer
        self.prompt = _prompt_box(prompt)
        super().__init__([self.prompt])
        self.update()

    def compute(self):
        views = embedding_views(self.model, self.tokenizer, self.prompt.value)
        self.views = views
        return embedding_summary(views), figure_png(embedding_figure(views["tok"], views["pos"], views["sum"],
                                                                     views["labels"]))
