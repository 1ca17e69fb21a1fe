"""Checks of the exercises in notebooks/01_tokens_and_embeddings.ipynb."""

from __future__ import annotations

import torch

from ..model import Trace
from .common import correct, require, require_close, require_number, unanswered


def check_embed(fn, model, tokenizer) -> None:
    """Exercise 1: ``fn(idx)`` (B, T) -> the input of block 0, (B, T, D)."""
    a, b = tokenizer.encode("Return the length of a list"), tokenizer.encode("Raise an error if it is empty")
    n = min(len(a), len(b))
    idx = torch.tensor([a[:n], b[:n]], device=model.transformer.wte.weight.device)   # (2, n)
    got = fn(idx)
    if unanswered(got):
        return
    trace = Trace()
    with torch.no_grad():
        model(idx, trace=trace)
    require_close(got, trace["embed.sum"], "the values differ from the model's input of block 0: "
                  "add the token's row of wte and the position's row of wpe",
                  shape_hint="it should be (B, T, D): one vector per token of each sequence")
    correct()


def check_count(n, model) -> None:
    """Exercise 2: the numbers in the two embedding tables."""
    if unanswered(n):
        return
    require_number(n)
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    require(n != wte.numel(), "that is the token table only; the position table holds numbers too")
    require(n == wte.numel() + wpe.numel(), "count rows × columns of both tables (tokens and positions)")
    correct()


def check_word(word, tokenizer) -> None:
    """Exercise 3: a word of >= 6 letters that is one token after a space."""
    if unanswered(word):
        return
    require(isinstance(word, str), f"the answer should be a word (a str), got {type(word).__name__}")
    require(len(word) >= 6 and word.isalpha(), "the word needs at least 6 letters and nothing else")
    pieces = tokenizer.tokens(tokenizer.encode(" " + word))
    require(len(pieces) == 1, f"{word!r} after a space is {len(pieces)} tokens: {pieces}")
    correct()
