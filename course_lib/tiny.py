"""The shipped tiny model: checkpoint, tokenizer and training record in ``course_lib/assets/``.

``scripts/make_assets.py`` makes them (corpus → tokenizer → training); every notebook loads them
with :func:`load_tiny`. Introduced in notebooks/00_start_here.ipynb.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from . import checkpoint
from .data import ASSETS
from .tokenizer import Tokenizer

TINY_DIR = ASSETS / "tiny-gpt"
TOKENIZER_PATH = ASSETS / "tokenizer.json"
RECORD_PATH = ASSETS / "training_record.json"


@lru_cache(maxsize=1)
def load_tokenizer() -> Tokenizer:
    return Tokenizer.load(TOKENIZER_PATH)


def load_tiny(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer): the course's trained tiny GPT in eval mode, and its tokenizer."""
    return checkpoint.load(TINY_DIR, device=device, dtype=dtype), load_tokenizer()


def training_record() -> dict:
    """Loss curve, validation loss, samples and timings of the shipped model's training run."""
    return json.loads(RECORD_PATH.read_text())
