"""The course's offline corpus and the batches cut from it.

The corpus is English text that ships with every Python install: the help pages of the language
reference (``pydoc_data.topics``) and the docstrings of a fixed list of standard-library modules.
The version the course trained on is committed as ``course_lib/assets/corpus.txt`` so the shipped model's numbers reproduce on any
Python. Nothing is downloaded. Introduced in notebooks/01_tokens_and_embeddings.ipynb.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tokenizer import ALPHABET, EOS, normalize

ASSETS = Path(__file__).resolve().parent / "assets"
CORPUS_PATH = ASSETS / "corpus.txt"
VAL_EVERY = 20  # every 20th document is held out for validation


# Standard-library modules whose docstrings join the help topics in the corpus.
DOC_MODULES = """abc argparse ast asyncio base64 bisect calendar codecs collections contextlib copy csv
dataclasses datetime decimal difflib dis enum fnmatch fractions functools getopt gettext glob gzip
hashlib heapq hmac html http.client imaplib inspect io ipaddress itertools json locale logging lzma
mailbox math mimetypes numbers operator optparse os pathlib pdb pprint queue random re sched secrets
selectors shelve shlex shutil signal smtplib socket sqlite3 statistics string struct subprocess
tarfile tempfile textwrap threading time timeit tokenize traceback types typing unittest
urllib.parse uuid warnings weakref zipfile zlib""".split()


def _docstring_documents() -> list[str]:
    """One document per module docstring and per public function or class documented in it."""
    import importlib
    import inspect

    docs = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        if (doc := inspect.getdoc(module)):
            docs.append(doc)
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            if getattr(obj, "__module__", None) not in (name, "_" + name):
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40:
                docs.append(f"{name}.{attr}\n\n{doc}")
    return docs


def build_corpus() -> str:
    """This Python's help topics and docstrings, normalised to the tokenizer's alphabet, joined by EOS."""
    from pydoc_data.topics import topics

    allowed = set(ALPHABET)
    docs = []
    for raw in [topics[name] for name in sorted(topics)] + _docstring_documents():
        text = "".join(ch for ch in normalize(raw) if ch in allowed).strip()
        if text:
            docs.append(text)
    return EOS.join(docs)


def load_corpus(path: str | Path = CORPUS_PATH) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no corpus at {path}; run `python scripts/make_assets.py` to build it")
    return path.read_text()


def split_documents(corpus: str) -> tuple[list[str], list[str]]:
    """Train and validation documents: every ``VAL_EVERY``-th document is held out."""
    docs = corpus.split(EOS)
    val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    return train, val


def encode_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    """One long stream of ids, each document followed by EOS. (N,) long."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.long)


def random_batch(stream: torch.Tensor, batch_size: int, block_size: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows: inputs (B, T) and the same shifted by one as targets (B, T)."""
    starts = torch.randint(0, len(stream) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([stream[s:s + block_size] for s in starts.tolist()])
    y = torch.stack([stream[s + 1:s + block_size + 1] for s in starts.tolist()])
    return x, y


def eval_windows(stream: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every non-overlapping window of the stream, in order: a fixed evaluation set (N, T)."""
    n = (len(stream) - 1) // block_size
    x = stream[: n * block_size].view(n, block_size)
    y = stream[1: n * block_size + 1].view(n, block_size)
    return x, y
