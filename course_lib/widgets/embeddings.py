"""Notebook 01's widget: type text, see its tokens, ids and the embeddings they become.

Introduced in notebooks/01_tokens_and_embeddings.ipynb.
"""

from __future__ import annotations

import torch

from ..model import Trace
from ..viz.embeddings import embedding_figure, update_embedding_figure
from .attention import _prompt_box
from .common import Explorer, detach_figure, prompt_ids


@torch.no_grad()
def embedding_views(model, tokenizer, prompt: str) -> dict:
    """ids, labels and the three (T, D) matrices: token embeddings, position embeddings, their sum."""
    ids = prompt_ids(tokenizer, prompt, model.config.n_positions)
    trace = Trace()
    model(torch.tensor([ids], device=model.transformer.wte.weight.device), trace=trace)
    return {"ids": ids, "labels": tokenizer.labels(ids), "tokens": tokenizer.tokens(ids),
            "tok": trace["embed.tok"][0].cpu(), "pos": trace["embed.pos"].cpu(), "sum": trace["embed.sum"][0].cpu()}


def embedding_summary(views: dict, max_ids: int = 12) -> str:
    """One line: the number of tokens, the input's shape and the first ``max_ids`` token ids
    (the figure labels every row with its token)."""
    T, D = views["sum"].shape
    ids = " ".join(str(i) for i in views["ids"][:max_ids]) + (" …" if T > max_ids else "")
    return f"{T} tokens → input of shape (1, {T}, {D}); ids {ids}"


class EmbeddingExplorer(Explorer):
    """A prompt box; shows the tokens with their ids and the embedding heatmaps.

    The figure is kept: a prompt of as many tokens as the last one only gets new values and
    labels; a prompt of another length redraws it (its height follows the number of tokens)."""

    def __init__(self, model, tokenizer, prompt: str = "A list is a mutable sequence."):
        self.model, self.tokenizer = model, tokenizer
        self.prompt = _prompt_box(prompt)
        super().__init__([self.prompt])
        self.update()

    def compute(self):
        views = embedding_views(self.model, self.tokenizer, self.prompt.value)
        self.views = views
        return embedding_summary(views), self.render(views, len(views["ids"]))

    def draw(self, views) -> None:
        self.fig = detach_figure(embedding_figure(views["tok"], views["pos"], views["sum"], views["labels"],
                                                  fig=self.fig))

    def refresh(self, views) -> None:
        update_embedding_figure(self.fig, views["tok"], views["pos"], views["sum"], views["labels"])
