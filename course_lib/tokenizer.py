"""A byte-pair-encoding tokenizer trained by the course's own code.

Text is first split into pieces ("pretokens": a word with its leading space, a run of digits,
a run of punctuation, a run of whitespace), then each piece is built up from single characters
by the learned merges, most frequent pair first. The alphabet is printable ASCII plus newline,
so every token is readable as a heatmap label; text outside it raises :class:`TokenizerError`.

Id 0 is ``<|endoftext|>``, which separates documents. Introduced in
notebooks/01_tokens_and_embeddings.ipynb.
"""

from __future__ import annotations

import heapq
import json
import operator
import re
from collections import Counter, defaultdict
from pathlib import Path

from .errors import TokenizerError

EOS = "<|endoftext|>"
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
PRETOKEN_PATTERN = r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"
FORMAT = "course-bpe-v1"
_CACHE_MAX_PIECE = 64        # pieces longer than this are encoded every time, not cached
_CACHE_MAX_ENTRIES = 100_000  # the cache is emptied when it reaches this many pieces

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
        self._allowed = frozenset(alphabet)
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    @property
    def eos_id(self) -> int:
        return 0

    # ------------------------------------------------------------------ encode
    def _check_alphabet(self, text: str, original: str | None = None) -> None:
        """Raise for the first character of ``text`` (normalized; ``<|endoftext|>`` allowed) that
        is not in the alphabet. ``original`` is the text before :func:`normalize`: the error then
        names the character and its position as the caller wrote them."""
        allowed = self._allowed
        offset = 0
        for part in text.split(EOS):
            if not allowed.issuperset(part):
                pos = offset + next(i for i, ch in enumerate(part) if ch not in allowed)
                raise self._unencodable(text, pos, original)
            offset += len(part) + len(EOS)

    def _unencodable(self, text: str, pos: int, original: str | None) -> TokenizerError:
        ch, where, source = text[pos], text, ""
        if original is not None and original != text:
            done = 0  # characters of ``text`` produced by original[:opos]
            for opos, och in enumerate(original):
                done += len(och.translate(_TYPOGRAPHIC))
                if done > pos:
                    break
            where, pos = original, opos
            if och != ch:  # an allowed look-alike of a typographic character is itself missing
                source = f", which {och!r} (U+{ord(och):04X}) is normalized to,"
        line = where.count("\n", 0, pos) + 1
        column = pos - (where.rfind("\n", 0, pos) + 1) + 1
        which = " (printable ASCII and newline)" if self.alphabet == ALPHABET else ""
        return TokenizerError(
            f"character {ch!r} (U+{ord(ch):04X}){source} at position {pos} (line {line}, column {column}) "
            f"is not in this tokenizer's alphabet{which}; remove or replace it")

    def _merge_symbols(self, piece: str) -> list[str]:
        """Apply the merges to one pretoken; return its final symbols.

        Same result as "repeatedly merge the lowest-rank adjacent pair, leftmost first", but in
        O(n log n) instead of O(n^2): the symbols form a linked list (``nxt``/``prv`` by start
        position), and a heap holds ``(rank, start of left symbol)`` for every adjacent pair that
        has a merge. A popped entry is stale when its left symbol was absorbed or either symbol
        grew since the push (the pair no longer spells the ranked merge); it is skipped.
        """
        n = len(piece)
        if n < 2:
            return list(piece)
        ranks = self.ranks
        sym = list(piece)                 # sym[i]: the symbol starting at position i ('' if absorbed)
        nxt = list(range(1, n + 1))       # start of the next symbol; n past the end
        prv = list(range(-1, n - 1))      # start of the previous symbol; -1 before the start
        heap = [(ranks[pair], i) for i, pair in enumerate(zip(piece, piece[1:])) if pair in ranks]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if not sym[i] or j >= n or ranks.get((sym[i], sym[j])) != rank:
                continue                  # stale entry
            sym[i] += sym[j]              # merge: i absorbs j
            sym[j] = ""
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
                r = ranks.get((sym[i], sym[k]))
                if r is not None:
                    heapq.heappush(heap, (r, i))
            p = prv[i]
            if p >= 0:
                r = ranks.get((sym[p], sym[i]))
                if r is not None:
                    heapq.heappush(heap, (r, p))
        out, i = [], 0
        while i < n:
            out.append(sym[i])
            i = nxt[i]
        return out

    def _encode_piece(self, piece: str) -> list[int]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        symbols = self._merge_symbols(piece)
        ids = [self.token_to_id[s] for s in symbols]
        if len(piece) <= _CACHE_MAX_PIECE:  # a long one-off piece (a 50 kB word) is not kept
            if len(self._cache) >= _CACHE_MAX_ENTRIES:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Text → token ids. ``<|endoftext|>`` in the text becomes id 0."""
        if not isinstance(text, str):
            hint = "; decode the bytes first, e.g. data.decode('utf-8')" if isinstance(text, (bytes, bytearray)) else ""
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}{hint}")
        original, text = text, normalize(text)
        self._check_alphabet(text, original)
        ids: list[int] = []
        for n, part in enumerate(text.split(EOS)):
            if n:
                ids.append(self.eos_id)
            for piece in self._pattern.findall(part):
                ids.extend(self._encode_piece(piece))
        return ids

    # ------------------------------------------------------------------ decode
    def _check_ids(self, ids) -> list[int]:
        """A flat sequence of integer ids (list, tuple, 1-D tensor or array) → list of int in range."""
        if hasattr(ids, "tolist"):
            kind = type(ids).__name__
            ids = ids.tolist()  # tensor / array → nested lists of Python numbers
            if not isinstance(ids, list):
                raise TokenizerError(f"decode takes a sequence of token ids, got a 0-d {kind}; wrap it in a list")
        if isinstance(ids, (str, bytes, bytearray, dict, set)) or not hasattr(ids, "__iter__"):
            raise TokenizerError(f"decode takes a sequence of token ids, got {type(ids).__name__}")
        out = []
        for n, i in enumerate(ids):
            try:
                if isinstance(i, bool):
                    raise TypeError
                value = operator.index(i)  # int, numpy/torch integer; refuses floats, strings, lists
            except TypeError:
                kind = type(i).__name__
                hint = (" (decode takes one flat sequence: decode each row of a batch)"
                        if isinstance(i, (list, tuple)) or getattr(i, "ndim", 0) else "")
                raise TokenizerError(f"token id at index {n} is {i!r:.60} of type {kind}; token ids must be "
                                     f"integers{hint}") from None
            if not 0 <= value < self.vocab_size:
                raise TokenizerError(f"token id {value} at index {n} is out of range: this tokenizer has "
                                     f"ids 0..{self.vocab_size - 1}")
            out.append(value)
        return out

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
    original, text = text, normalize(text)
    pattern = re.compile(PRETOKEN_PATTERN)
    counts: Counter[str] = Counter()
    Tokenizer([], alphabet)._check_alphabet(text, original)
    for part in text.split(EOS):
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
