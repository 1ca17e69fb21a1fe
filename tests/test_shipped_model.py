"""The shipped tiny model: loads, reproduces its recorded validation loss, writes corpus-like text."""

import pytest
import torch

from course_lib.data import encode_documents, load_corpus, split_documents
from course_lib.tiny import load_tiny, training_record
from course_lib.train import evaluate


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


def test_recorded_validation_loss_reproduces(tiny):
    model, tokenizer = tiny
    _, val_docs = split_documents(load_corpus())
    val_ids = encode_documents(tokenizer, val_docs)
    record = training_record()
    assert record["val_tokens"] == len(val_ids)
    assert evaluate(model, val_ids) == pytest.approx(record["final_val_loss"], abs=2e-3)


def test_model_learned_something(tiny):
    record = training_record()
    assert record["final_val_loss"] < 0.6 * record["train_loss"][0]
    assert record["seconds"] < 600, "the shipped model must train in at most 10 minutes"


def test_shipped_tokenizer_round_trips_the_corpus(tiny):
    _, tokenizer = tiny
    corpus = load_corpus()
    assert tokenizer.decode(tokenizer.encode(corpus)) == corpus
    assert tokenizer.vocab_size == tiny[0].config.vocab_size


def test_greedy_text_uses_corpus_words(tiny):
    model, tokenizer = tiny
    out = model.generate(torch.tensor([tokenizer.encode("The for statement")]), max_new_tokens=30)
    text = tokenizer.decode(out[0])
    corpus_words = set(load_corpus().split())
    words = text.split()
    assert sum(w in corpus_words for w in words) >= 0.8 * len(words)


def test_assets_are_small():
    from course_lib.data import ASSETS

    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total <= 20 * 2**20
