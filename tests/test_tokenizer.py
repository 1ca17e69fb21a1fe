import pytest

from course_lib.errors import TokenizerError
from course_lib.tokenizer import ALPHABET, EOS, Tokenizer, normalize, train_bpe

TEXT = ("The for statement is used to iterate over the elements of a sequence.\n"
        "    for x in range(10):\n        print(x)\n") * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT, vocab_size=160)


def test_round_trip(tok):
    for text in [TEXT, "a", " ", "\n\n", "x = [1, 2, 3]  # comment", "The for" + EOS + "next"]:
        assert tok.decode(tok.encode(text)) == text


def test_training_is_deterministic_and_merges_help(tok):
    again = train_bpe(TEXT, vocab_size=160)
    assert again.merges == tok.merges
    assert tok.vocab_size == 160
    assert len(tok.encode(TEXT)) < len(TEXT) / 2


def test_save_load(tok, tmp_path):
    tok.save(tmp_path / "t.json")
    loaded = Tokenizer.load(tmp_path / "t.json")
    assert loaded.encode(TEXT) == tok.encode(TEXT)


def test_eos_is_id_zero(tok):
    assert tok.encode(EOS) == [0]
    assert tok.decode([0]) == EOS


def test_labels_are_visible(tok):
    ids = tok.encode("for x\n  y")
    labels = tok.labels(ids)
    assert all(label.strip() for label in labels)
    assert "".join(tok.tokens(ids)) == "for x\n  y"


def test_typographic_characters_are_normalised(tok):
    assert normalize("\u201cdon\u2019t\u201d \u2014 ok\u2026") == '"don\'t" -- ok...'
    assert tok.decode(tok.encode("it\u2019s")) == "it's"


@pytest.mark.parametrize("text, char", [("caf\u00e9", "\u00e9"), ("hi \U0001f600", "\U0001f600"), ("\u4e2d\u6587", "\u4e2d")])
def test_unencodable_text_has_clear_error(tok, text, char):
    with pytest.raises(TokenizerError, match=r"not in this tokenizer's alphabet") as e:
        tok.encode(text)
    assert repr(char) in str(e.value)


def test_decode_rejects_out_of_range(tok):
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([-1])


def test_encode_rejects_non_string(tok):
    with pytest.raises(TokenizerError, match="takes a str"):
        tok.encode(b"bytes")


def test_corrupt_tokenizer_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        Tokenizer.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(TokenizerError, match="not a course-bpe-v1"):
        Tokenizer.load(tmp_path / "other.json")
    with pytest.raises(TokenizerError, match="no tokenizer file"):
        Tokenizer.load(tmp_path / "missing.json")


def test_vocab_size_too_small():
    with pytest.raises(TokenizerError, match="at least"):
        train_bpe("abc", vocab_size=len(ALPHABET))
