"""Quality rules of one document: Gopher's quality and repetition heuristics and C4's rules.

What it is: three small filters, each a pure function of a document's text with the published
thresholds as constructor defaults (Gopher: Rae et al. 2021, table A1 and section A.1.1; C4: Raffel
et al. 2020, section 2.2), written after datatrove's ``GopherQualityFilter``,
``GopherRepetitionFilter`` and ``C4QualityFilter``. ``filter(text)`` returns None to keep the
document or the reason string of the first rule it breaks; :class:`C4Quality` may also return
the text with some lines removed (``clean``). ``scores(text)`` gives the figures the rules compare,
for the curation report's histograms.

What it is not: Ray, I/O, or the choice of which filters run (flows/data/curate/apply.py). Words are
whitespace-separated tokens with punctuation stripped at their ends: a fixed, language-agnostic
rule (datatrove uses a language's word tokenizer; counts differ slightly on punctuation).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import numpy as np

_PUNCT = frozenset(string.punctuation) | frozenset("…«»“”‘’„–—•·")
_STRIP = "".join(sorted(_PUNCT))
_PARAGRAPH = re.compile(r"\n{2,}")
_LETTER = re.compile(r"[^\W\d_]")
_LINES = re.compile(r"\n+")

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")  # Gopher's list


def words_of(text: str) -> list[str]:
    """Whitespace tokens, lowercased, with punctuation stripped at both ends ('' for pure
    symbols)."""
    return [w.strip(_STRIP).lower() for w in text.split()]


@dataclass(frozen=True)
class GopherQuality:
    """Gopher's quality rules (MassiveText, table A1 and section A.1.1). None disables a rule."""

    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3.0
    max_avg_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # '#' and '...' each, per word
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8  # words with at least one letter
    min_stop_words: int | None = 2
    stop_words: tuple[str, ...] = STOP_WORDS

    def scores(self, text: str, words: list[str] | None = None) -> dict[str, float]:
        """The rules' figures; `words` is ``words_of(text)`` when the caller has it already."""
        raw = text.split()
        words = words_of(text) if words is None else words
        content = [w for w in words if w]  # words that are not only symbols
        lines = text.splitlines() or [""]
        n = max(1, len(raw))
        return {
            "words": float(len(content)),
            "avg_word_length": sum(map(len, content)) / len(content) if content else 0.0,
            "hash_ratio": text.count("#") / n,
            "ellipsis_ratio": (text.count("...") + text.count("…")) / n,
            "bullet_lines": sum(s.lstrip().startswith(("•", "-", "*", "·")) for s in lines)
            / len(lines),
            "ellipsis_lines": sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines),
            "alpha_words": sum(1 for w in raw if _LETTER.search(w)) / n,
            "stop_words": float(len(set(self.stop_words).intersection(words))),
        }

    def filter(self, text: str, s: dict[str, float] | None = None) -> str | None:
        s = s or self.scores(text)
        checks = (
            (self.min_doc_words, lambda v: s["words"] < v, "gopher_short_doc"),
            (self.max_doc_words, lambda v: s["words"] > v, "gopher_long_doc"),
            (self.min_avg_word_length, lambda v: s["avg_word_length"] < v, "gopher_short_words"),
            (self.max_avg_word_length, lambda v: s["avg_word_length"] > v, "gopher_long_words"),
            (self.max_symbol_word_ratio, lambda v: s["hash_ratio"] > v, "gopher_hashes"),
            (self.max_symbol_word_ratio, lambda v: s["ellipsis_ratio"] > v, "gopher_ellipsis"),
            (self.max_bullet_lines_ratio, lambda v: s["bullet_lines"] > v, "gopher_bullet_lines"),
            (
                self.max_ellipsis_lines_ratio,
                lambda v: s["ellipsis_lines"] > v,
                "gopher_ellipsis_lines",
            ),
            (self.min_alpha_words_ratio, lambda v: s["alpha_words"] < v, "gopher_alpha_words"),
            (self.min_stop_words, lambda v: s["stop_words"] < v, "gopher_stop_words"),
        )
        for threshold, broken, reason in checks:
            if threshold is not None and broken(threshold):
                return reason
        return None


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(elements, characters) that repeat an earlier element."""
    seen: set[str] = set()
    count = chars = 0
    for x in items:
        if x in seen:
            count += 1
            chars += len(x)
        else:
            seen.add(x)
    return count, chars


# Odd 64-bit multipliers: an n-gram of word ids becomes one uint64 (collisions ~ 2**-64 a pair).
_MULT = np.random.default_rng(0x6F706865).integers(
    1, 1 << 63, size=16, dtype=np.uint64
) | np.uint64(1)


def _ngram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    count = len(ids) - n + 1
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        key = ids[:count] * _MULT[0]
        for k in range(1, n):
            key = key + ids[k : k + count] * _MULT[k]
    return key


def _ngram_stats(ids: np.ndarray, lens: np.ndarray, n: int) -> tuple[int, int]:
    """(characters of the most frequent n-gram times its count, 0 when no n-gram repeats;
    characters of the words inside n-grams that occurred before, overlaps counted once)."""
    if len(ids) < n:
        return 0, 0
    keys = _ngram_keys(ids, n)
    # One stable sort groups equal n-grams with their positions in order: each group's first
    # element is the n-gram's first occurrence, the rest are repeats (np.unique's index, inverse
    # and counts, without the inverse's extra passes).
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    counts = np.diff(np.append(starts, len(keys)))
    top = int(np.argmax(counts))  # the first of the largest groups: the smallest n-gram key
    top_chars = 0
    if counts[top] > 1:
        wchars = np.concatenate([[0], np.cumsum(lens)])
        first = int(order[starts[top]])
        top_chars = int(counts[top]) * int(wchars[first + n] - wchars[first])
    is_first = np.zeros(len(keys), dtype=bool)
    is_first[starts] = True
    repeated = order[~is_first]
    if not len(repeated):
        return top_chars, 0
    edge = np.zeros(len(ids) + 1, dtype=np.int64)
    np.add.at(edge, repeated, 1)
    np.add.at(edge, repeated + n, -1)
    covered = np.cumsum(edge[:-1]) > 0
    return top_chars, int(lens[covered].sum())


@dataclass(frozen=True)
class GopherRepetition:
    """Gopher's repetition rules (table A1): duplicate lines and paragraphs, top and duplicate
    n-grams as fractions of the document's characters. None disables a rule."""

    dup_line_frac: float | None = 0.30
    dup_para_frac: float | None = 0.30
    dup_line_char_frac: float | None = 0.20
    dup_para_char_frac: float | None = 0.20
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = (
        (5, 0.15),
        (6, 0.14),
        (7, 0.13),
        (8, 0.12),
        (9, 0.11),
        (10, 0.10),
    )

    def scores(self, text: str, words: list[str] | None = None) -> dict[str, float]:
        """The rules' figures; `words` is ``words_of(text)`` when the caller has it already."""
        size = max(1, len(text))
        paragraphs = [p for p in _PARAGRAPH.split(text.strip()) if p.strip()] or [""]
        lines = [x for x in _LINES.split(text.strip()) if x.strip()] or [""]
        p_count, p_chars = _duplicates([p.strip() for p in paragraphs])
        l_count, l_chars = _duplicates([x.strip() for x in lines])
        words = [w for w in (words_of(text) if words is None else words) if w]
        # n-gram characters over the characters of the words (not of the whole text, as datatrove
        # does): whitespace and punctuation then neither hide nor inflate repetition.
        vocab: dict[str, int] = {}
        ids = np.fromiter(
            (vocab.setdefault(w, len(vocab)) for w in words), dtype=np.uint64, count=len(words)
        )
        lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        word_chars = max(1, int(lens.sum()))
        out = {
            "dup_para_frac": p_count / len(paragraphs),
            "dup_para_char_frac": p_chars / size,
            "dup_line_frac": l_count / len(lines),
            "dup_line_char_frac": l_chars / size,
        }
        for n, _ in self.top_n_grams:
            out[f"top_{n}_gram"] = _ngram_stats(ids, lens, n)[0] / word_chars
        for n, _ in self.dup_n_grams:
            out[f"dup_{n}_gram"] = _ngram_stats(ids, lens, n)[1] / word_chars
        return out

    def filter(self, text: str, s: dict[str, float] | None = None) -> str | None:
        s = s or self.scores(text)
        for key in ("dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac"):
            limit = getattr(self, key)
            if limit is not None and s[key] > limit:
                return f"gopher_{key}"
        for n, limit in self.top_n_grams:
            if s[f"top_{n}_gram"] > limit:
                return f"gopher_top_{n}_gram"
        for n, limit in self.dup_n_grams:
            if s[f"dup_{n}_gram"] > limit:
                return f"gopher_dup_{n}_gram"
        return None


_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
_POLICY_RE = re.compile("|".join(map(re.escape, _POLICY)))
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_END_PUNCT = (".", "?", "!", '"', "'")


@dataclass(frozen=True)
class C4Quality:
    """C4's rules (Raffel et al. 2020, section 2.2, and TFDS ``c4_utils``): a document with
    "lorem ipsum" or (optionally) a curly brace is dropped; lines that mention javascript or
    cookie/terms-of-use policies, lines without terminal punctuation and lines of too few words are
    removed (each switchable); a document left with too few sentences is dropped.

    C4's own defaults drop any page with a ``{`` and every line that does not end in ``.?!"'``;
    those two wreck code-bearing documentation and chat text, so they are switches here (the
    curation config chooses)."""

    filter_lorem_ipsum: bool = True
    filter_curly_bracket: bool = True
    filter_javascript: bool = True
    filter_policy: bool = True
    filter_no_terminal_punct: bool = True
    min_words_per_line: int = 3  # 0 disables
    max_word_length: int = 1000  # lines with a longer word are removed; 0 disables
    min_num_sentences: int = 5  # 0 disables
    remove_citations: bool = True

    def clean(self, text: str) -> tuple[str | None, str | None, int]:
        """(text with C4's lines removed, None) or (None, reason); and the lines removed."""
        kept: list[str] = []
        sentences = removed = 0
        for raw in text.splitlines():
            line = raw.strip()
            lower = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lower:
                return None, "c4_lorem_ipsum", removed
            if self.filter_curly_bracket and "{" in line:
                return None, "c4_curly_bracket", removed
            if not line:
                kept.append(raw)
                continue
            words = line.split()
            if self.remove_citations:  # "...as shown [12]." ends a sentence all the same
                line = _CITATION.sub("", line).rstrip()
            if (
                (self.max_word_length and max(map(len, words)) > self.max_word_length)
                or (
                    self.filter_no_terminal_punct
                    and (not line.endswith(_END_PUNCT) or line.endswith("..."))
                )
                or (self.min_words_per_line and len(words) < self.min_words_per_line)
                or (self.filter_javascript and "javascript" in lower)
                or (self.filter_policy and _POLICY_RE.search(lower))
            ):
                removed += 1
                continue
            sentences += max(1, sum(line.count(p) for p in ".?!"))
            kept.append(raw)
        if self.min_num_sentences and sentences < self.min_num_sentences:
            return None, "c4_too_few_sentences", removed
        out = "\n".join(kept).strip()
        if not out:
            return None, "c4_no_lines_left", removed
        return (out if removed else text), None, removed

    def filter(self, text: str) -> str | None:
        return self.clean(text)[1]
