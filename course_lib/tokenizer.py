"""A byte-pair-encoding tokenizer trained by the course's own code.

Text is first split into pieces ("pretokens": a word with its leading space, a run of digits,
a run of punctuation, a run of whitespace), then each piece is built up from single characters
by the learned merges, most frequent pair first. The alphabet is printable ASCII plus newline,
so every token is readable as a heatmap label; text outside it raises :class:`TokenizerError`.

Id 0 is ``<|endoftext|>``, which separates documents. Introduced in
notebooks/01_tokens_and_embeddings.ipynb.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from .errors import TokenizerError

EOS = "<|endoftext|>"
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
PRETOKEN_PATTERN = r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"
FORMAT = "course-bpe-v1"

# Typographic characters that editors insert for you, mapped to their ASCII look-alikes.
_TYPOGRAPHIC = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                              "\u2013": "-", "\u2014": "--", "\u2026": "...", "\t": "    ",
                              "\u00a0": " ", "\r": ""})


def normalize(text: str) -> str:
    """Curly quotes, dashes, ellipses, tabs and non-breaking spaces → ASCII; nothing else changes."""
    return text.translate(_TYPOGRAPHIC)


class Tokenizer:
    """Encode text to ids and back. Build one with :func:`train_bpe` or :meth:`Tokenizer.load`."""

    def __init__(self, merges: list[tuple[str, str]], alphabet: str = ALPHABET):
        self.alphabet = alphabet
        self.merges = [tuple(m) for m in merges]
        # Two merges can spell the same string ("a"+"bc", "ab"+"c"): such a token gets one id.
        self.id_to_token: list[str] = list(dict.fromkeys([EOS, *alphabet, *(a + b for a, b in self.merges)]))
        self.token_to_id = {t: i for i, t in enumerate(self.id_to_token)}
        self.ranks = {pair: r for r, pair in enumerate(self.merges)}
        self._pattern = re.compile(PRETOKEN_PATTERN)
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    @property
    def eos_id(self) -> int:
        return 0

    # ------------------------------------------------------------------ encode
    def _check_alphabet(self, text: str) -> None:
        allowed = set(self.alphabet)
        for pos, ch in enumerate(text):
            if ch not in allowed:
                raise TokenizerError(
                    f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in this tokenizer's "
                    "alphabet (printable ASCII and newline); remove or replace it")

    def _encode_piece(self, piece: str) -> list[int]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        symbols = list(piece)
        while len(symbols) > 1:
            pairs = [(self.ranks.get((a, b), len(self.ranks)), i)
                     for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
            rank, i = min(pairs)
            if rank == len(self.ranks):
                break
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        ids = [self.token_to_id[s] for s in symbols]
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Text → token ids. ``<|endoftext|>`` in the text becomes id 0."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        text = normalize(text)
        ids: list[int] = []
        for n, part in enumerate(text.split(EOS)):
            if n:
                ids.append(self.eos_id)
            self._check_alphabet(part)
            for piece in self._pattern.findall(part):
                ids.extend(self._encode_piece(piece))
        return ids

    # ------------------------------------------------------------------ decode
    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is out of range: this tokenizer has ids 0..{self.vocab_size - 1}")
        return ids

    def decode(self, ids) -> str:
        return "".join(self.id_to_token[i] for i in self._check_ids(ids))

    def tokens(self, ids) -> list[str]:
        """The raw string of each id."""
        return [self.id_to_token[i] for i in self._check_ids(ids)]

    def labels(self, ids) -> list[str]:
        """Short visible labels for plots: a word's leading space dropped, newline as '↵',
        a run of spaces as '·' per space."""
        out = []
        for tok in self.tokens(ids):
            if tok.strip() == "":  # whitespace only: make it visible
                out.append(tok.replace(" ", "·").replace("\n", "↵"))
            else:
                out.append(tok.lstrip(" ").replace("\n", "↵"))
        return out

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        data = {"format": FORMAT, "alphabet": self.alphabet, "eos": EOS,
                "pattern": PRETOKEN_PATTERN, "merges": [list(m) for m in self.merges]}
        Path(path).write_text(json.dumps(data, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise TokenizerError(f"no tokenizer file at {path}; run scripts/make_assets.py to build one") from None
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{path} is not valid JSON ({e}); rebuild it with scripts/make_assets.py") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TokenizerError(f"{path} is not a {FORMAT} tokenizer file")
        merges = data.get("merges")
        if not isinstance(merges, list) or not all(isinstance(m, list) and len(m) == 2 for m in merges):
            raise TokenizerError(f"{path} has malformed merges; rebuild it with scripts/make_assets.py")
        return cls(merges, data.get("alphabet", ALPHABET))


def train_bpe(text: str, vocab_size: int, alphabet: str = ALPHABET) -> Tokenizer:
    """Learn merges on ``text`` until the vocabulary has ``vocab_size`` entries.

    Classic BPE over pretoken counts: count adjacent symbol pairs, merge the most frequent
    (ties broken by the pair itself, so training is deterministic), update only the words that
    contain it, repeat.
    """
    base = 1 + len(alphabet)
    if vocab_size < base:
        raise TokenizerError(f"vocab_size must be at least {base} (EOS + alphabet), got {vocab_size}")
    text = normalize(text)
    pattern = re.compile(PRETOKEN_PATTERN)
    counts: Counter[str] = Counter()
    for part in text.split(EOS):
        Tokenizer([], alphabet)._check_alphabet(part)
        counts.update(pattern.findall(part))
    words = [list(w) for w in counts]
    freqs = list(counts.values())
    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for wi, (syms, f) in enumerate(zip(words, freqs)):
        for pair in zip(syms, syms[1:]):
            pair_counts[pair] += f
            where[pair].add(wi)

    merges: list[tuple[str, str]] = []
    vocab = {EOS, *alphabet}
    while len(vocab) < vocab_size and pair_counts:
        best, n = max(pair_counts.items(), key=lambda kv: (kv[1], kv[0]))
        if n < 2:
            break
        merges.append(best)
        merged = best[0] + best[1]
        vocab.add(merged)
        for wi in list(where.pop(best, ())):
            syms, f = words[wi], freqs[wi]
            for pair in zip(syms, syms[1:]):
                pair_counts[pair] -= f
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            new, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    new.append(merged)
                    i += 2
                else:
                    new.append(syms[i])
                    i += 1
            words[wi] = new
            for pair in zip(new, new[1:]):
                pair_counts[pair] += f
                where[pair].add(wi)
        pair_counts.pop(best, None)
    return Tokenizer(merges, alphabet)
