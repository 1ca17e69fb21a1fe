import random
import re
import time

import numpy as np
import pytest
import torch

from course_lib.data import CORPUS_PATH
from course_lib.errors import TokenizerError
from course_lib.tiny import TOKENIZER_PATH
from course_lib.tokenizer import ALPHABET, EOS, PRETOKEN_PATTERN, Tokenizer, normalize, train_bpe

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


# ---------------------------------------------------------------- the linear-time encoder
# The encoder before the heap rewrite, kept as the reference it must match token for token:
# repeatedly merge the adjacent pair of lowest merge rank, leftmost first (quadratic in a word).
def reference_encode(tok, text):
    text = normalize(text)
    ids = []
    for n, part in enumerate(text.split(EOS)):
        if n:
            ids.append(0)
        if any(ch not in tok.alphabet for ch in part):
            raise TokenizerError("unencodable")
        for piece in re.findall(PRETOKEN_PATTERN, part):
            symbols = list(piece)
            while len(symbols) > 1:
                rank, i = min((tok.ranks.get(pair, len(tok.ranks)), i)
                              for i, pair in enumerate(zip(symbols, symbols[1:])))
                if rank == len(tok.ranks):
                    break
                symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
            ids.extend(tok.token_to_id[s] for s in symbols)
    return ids


@pytest.fixture(scope="module")
def shipped():
    return Tokenizer.load(TOKENIZER_PATH)  # 927 merges learned on the course corpus; not the shared cached one


@pytest.fixture(scope="module")
def corpus_words():
    return re.findall(r"[A-Za-z]+", CORPUS_PATH.read_text()[:200_000])


def random_texts(rng, words, count):
    """Seeded random inputs: corpus-alphabet soup, glued corpus words (long words that many merges
    apply to), whitespace runs, digit/punctuation runs, EOS markers, typographic characters."""
    pieces = [lambda: rng.choice(ALPHABET) * rng.randint(1, 12),           # runs: "    ", "aaaa", "\n\n"
              lambda: "".join(rng.choices(ALPHABET, k=rng.randint(1, 30))),
              lambda: "".join(rng.choices(words, k=rng.randint(1, 40))),  # a long word without spaces
              lambda: " " + rng.choice(words),
              lambda: "".join(rng.choices(" \n", k=rng.randint(1, 20))),
              lambda: "".join(rng.choices("0123456789.,;:()[]{}<>=+-*/'\"#", k=rng.randint(1, 15))),
              lambda: EOS,
              lambda: rng.choice("\u2018\u2019\u201c\u201d\u2013\u2014\u2026\t\u00a0\r")]
    for _ in range(count):
        yield "".join(rng.choice(pieces)() for _ in range(rng.randint(1, 25)))


@pytest.mark.parametrize("seed", range(4))
def test_encoder_matches_the_reference_on_random_text(tok, shipped, corpus_words, seed):
    rng = random.Random(seed)
    for text in random_texts(rng, corpus_words, 60):
        for t in (tok, shipped):
            assert t.encode(text) == reference_encode(t, text), text
            assert t.decode(t.encode(text)) == normalize(text)


def test_encoder_matches_the_reference_on_long_words_and_runs(shipped, corpus_words):
    glued = "".join(corpus_words)
    texts = [glued[:1500], glued[5000:6200].lower(), glued[:800].upper(), "a" * 700, "ab" * 400,
             "the" * 300, " " * 500 + "x", "\n" * 300 + " y", "  \n " * 100, "1234567890" * 80,
             "=" * 600, "".join(random.Random(0).choices(ALPHABET, k=1500))]
    for text in texts:
        assert shipped.encode(text) == reference_encode(shipped, text), text[:40]


def test_random_unicode_is_refused_by_both_encoders(shipped):
    rng = random.Random(1)
    for _ in range(200):
        text = "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0, 0x2FFFF)])) for _ in range(rng.randint(1, 12)))
        try:
            expected = reference_encode(shipped, text)
        except TokenizerError:
            with pytest.raises(TokenizerError, match="not in this tokenizer's alphabet"):
                shipped.encode(text)
        else:
            assert shipped.encode(text) == expected


class CountingRanks(dict):
    """The merge-rank table, counting every lookup; it fails once the count exceeds ``budget``
    (so a quadratic encoder fails fast here instead of running for minutes)."""

    def __init__(self, ranks, budget):
        super().__init__(ranks)
        self.lookups, self.budget = 0, budget

    def _count(self):
        self.lookups += 1
        if self.lookups > self.budget:
            raise AssertionError(f"more than {self.budget} merge-rank lookups")

    def get(self, key, default=None):
        self._count()
        return super().get(key, default)

    def __getitem__(self, key):
        self._count()
        return super().__getitem__(key)

    def __contains__(self, key):
        self._count()
        return super().__contains__(key)


def test_encoding_work_is_linear_in_word_length(corpus_words):
    """Count the work instead of timing it: merge-rank lookups per letter stay bounded when a word
    without spaces grows 10x (the quadratic encoder needs ~n^2/2 lookups: ~10^6 at 2,000 letters)."""
    glued = "".join(corpus_words)
    per_letter = {}
    for n in (2_000, 20_000):
        tok = Tokenizer.load(TOKENIZER_PATH)
        tok.ranks = CountingRanks(tok.ranks, budget=20 * n)
        ids = tok.encode(glued[:n])
        assert len(ids) < n / 2            # merges did apply: this is not a trivial word
        per_letter[n] = tok.ranks.lookups / n
    assert per_letter[20_000] < 1.5 * per_letter[2_000], per_letter


def test_a_50_kB_word_encodes_quickly(shipped, corpus_words):
    word = "".join(corpus_words)[:50_000]   # ~0.2 s here; the quadratic encoder took ~11 minutes
    start = time.perf_counter()
    ids = shipped.encode(word)
    assert time.perf_counter() - start < 10   # generous: a loaded 2-core machine
    assert shipped.decode(ids) == word


def test_long_one_off_words_are_not_cached(shipped):
    shipped.encode("x" * 5000 + " y")
    assert "x" * 5000 not in shipped._cache and " y" in shipped._cache


# ---------------------------------------------------------------- precise errors
@pytest.mark.parametrize("text, char, where", [
    ("ab" + EOS + "caf\u00e9", "\u00e9", "position 18 (line 1, column 19)"),     # after an EOS marker
    ("x = 1\nprint(\u00e9)", "\u00e9", "position 12 (line 2, column 7)"),
    ("\u2014\u2026\tz\u00e9", "\u00e9", "position 4 (line 1, column 5)"),            # before normalize's expansion
    ("a\r\nb\r\n\u200b", "\u200b", "position 6 (line 3, column 1)"),
])
def test_unencodable_character_is_located_in_the_text_as_given(tok, text, char, where):
    with pytest.raises(TokenizerError, match="not in this tokenizer's alphabet") as e:
        tok.encode(text)
    assert repr(char) in str(e.value) and f"U+{ord(char):04X}" in str(e.value)
    assert where in str(e.value)
    assert text[int(where.split()[1])] == char


def test_a_missing_look_alike_names_the_typographic_original():
    small = Tokenizer([], alphabet="ab\n")          # no space, so a non-breaking space cannot be encoded
    with pytest.raises(TokenizerError, match=r"' ' \(U\+0020\), which '\\xa0' \(U\+00A0\) is normalized to, at position 2"):
        small.encode("ab\u00a0")


def test_encode_of_bytes_says_to_decode_them(tok):
    with pytest.raises(TokenizerError, match=r"got bytes; decode the bytes first"):
        tok.encode("hi".encode())


@pytest.mark.parametrize("ids, message", [
    ([1, 2.0, 3], r"token id at index 1 is 2.0 of type float"),
    ([1, 2.7], r"index 1 is 2.7 of type float"),
    (["5"], r"index 0 is '5' of type str"),
    ([3, True], r"index 1 is True of type bool"),
    ([[1, 2], [3, 4]], r"index 0 is \[1, 2\] of type list.*decode each row"),
    (np.array([1.0, 2.0]), r"index 0 is 1.0 of type float"),
    ([np.float64(4.0)], r"index 0 is .*4.0.* of type float64"),
    ([None], r"index 0 is None of type NoneType"),
    (torch.tensor([[1, 2]]), r"index 0 is \[1, 2\] of type list.*decode each row"),
    (torch.tensor(5), r"got a 0-d Tensor; wrap it in a list"),
    ("hello", r"decode takes a sequence of token ids, got str"),
    (7, r"decode takes a sequence of token ids, got int"),
    ([0, 1, 2 ** 63], rf"token id {2 ** 63} at index 2 is out of range: this tokenizer has ids 0\.\.159"),
    ([2 ** 80], rf"token id {2 ** 80} at index 0 is out of range.*0\.\.159"),
    ([np.uint64(2 ** 64 - 1)], rf"token id {2 ** 64 - 1} at index 0 is out of range"),
    (np.array([5, -3]), r"token id -3 at index 1 is out of range"),
])
def test_decode_names_the_bad_element(tok, ids, message):
    with pytest.raises(TokenizerError, match=message):
        tok.decode(ids)
    with pytest.raises(TokenizerError, match=message):
        tok.tokens(ids)


def test_decode_accepts_every_integer_container(tok):
    ids = tok.encode("for x in")
    text = "for x in"
    for form in (ids, tuple(ids), np.array(ids), np.array(ids, dtype=np.int32), torch.tensor(ids),
                 [np.int64(i) for i in ids], (i for i in ids)):
        assert tok.decode(form) == text
