"""The per-document curation chain that ``data.curate`` configures.

What it is: :class:`Curator` -- built once per worker from a :class:`~flows.config.CurateConfig`
-- whose :meth:`~Curator.apply` takes one cleaned document and returns a :class:`Verdict`: the text
to keep (PII redacted, C4's lines removed) or the reason it is dropped, plus the figures the report
histograms (quality scores, language score). Order: language, then quality (Gopher quality, Gopher
repetition, C4), then decontamination, then PII -- cheap and broad rules first, and PII last so
that only kept text is redacted. :class:`Histogram` counts scores into fixed bins (mergeable across
workers in constant memory).

What it is not: Ray, files, or near-duplicate search (minhash.py and shuffle.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flows.config import CurateConfig, QualityConfig
from flows.data.curate import pii
from flows.data.curate.decontam import Decontaminator
from flows.data.curate.language import LanguageFilter
from flows.data.curate.quality import C4Quality, GopherQuality, GopherRepetition, words_of

# Scores the report histograms, with their bin edges: (name, low, high, bins).
SCORES = (
    ("words", 0.0, 2000.0, 40),
    ("avg_word_length", 0.0, 15.0, 30),
    ("alpha_words", 0.0, 1.0, 20),
    ("stop_words", 0.0, 8.0, 8),
    ("dup_line_frac", 0.0, 1.0, 20),
    ("top_2_gram", 0.0, 0.5, 25),
    ("dup_5_gram", 0.0, 1.0, 20),
    ("language_score", 0.0, 1.0, 20),
)


@dataclass
class Verdict:
    text: str | None  # None: dropped
    reason: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    language: str | None = None
    pii: Counter = field(default_factory=Counter)


def gopher_quality(q: QualityConfig) -> GopherQuality:
    return GopherQuality(
        q.min_doc_words,
        q.max_doc_words,
        q.min_avg_word_length,
        q.max_avg_word_length,
        q.max_symbol_word_ratio,
        q.max_bullet_lines_ratio,
        q.max_ellipsis_lines_ratio,
        q.min_alpha_words_ratio,
        q.min_stop_words,
    )


def gopher_repetition(q: QualityConfig) -> GopherRepetition:
    return GopherRepetition(
        q.dup_line_frac,
        q.dup_para_frac,
        q.dup_line_char_frac,
        q.dup_para_char_frac,
        tuple(zip((2, 3, 4), q.top_ngram_fracs, strict=False)),
        tuple(zip(range(5, 11), q.dup_ngram_fracs, strict=False)),
    )


def c4_quality(q: QualityConfig) -> C4Quality:
    return C4Quality(
        filter_curly_bracket=q.c4_curly_bracket,
        filter_no_terminal_punct=q.c4_terminal_punct,
        min_words_per_line=q.c4_min_words_per_line,
        min_num_sentences=q.c4_min_sentences,
    )


class Curator:
    """One document in, a :class:`Verdict` out, as `cfg` says; `eval_ngrams` are decontamination's
    hashes (flows/data/curate/decontam.py), loaded once per worker."""

    def __init__(self, cfg: CurateConfig, eval_ngrams: np.ndarray | None = None) -> None:
        q = cfg.quality
        self.cfg = cfg
        self.language = (
            LanguageFilter(cfg.languages, cfg.language_min_score) if cfg.languages else None
        )
        self.gopher = gopher_quality(q) if q.enabled else None
        self.repetition = gopher_repetition(q) if q.enabled and q.repetition else None
        self.c4 = c4_quality(q) if q.enabled and q.c4 else None
        self.decontam = (
            Decontaminator(eval_ngrams, cfg.decontaminate_ngram)
            if eval_ngrams is not None and len(eval_ngrams)
            else None
        )

    @property
    def active(self) -> bool:
        return bool(self.language or self.gopher or self.decontam or self.cfg.pii != "off")

    def apply(self, text: str) -> Verdict:
        v = Verdict(text)
        if self.language is not None:
            reason, v.language, score = self.language.verdict(text)
            v.scores["language_score"] = score
            if reason:
                return self._drop(v, reason)
        if self.gopher is not None:
            words = words_of(text)  # both rule sets read the same words: split once
            s = self.gopher.scores(text, words)
            v.scores.update(s)
            if self.repetition is not None:
                v.scores.update(self.repetition.scores(text, words))
            if reason := self.gopher.filter(text, s):
                return self._drop(v, reason)
            if self.repetition is not None and (reason := self.repetition.filter(text, v.scores)):
                return self._drop(v, reason)
        if self.c4 is not None:
            cleaned, reason, _ = self.c4.clean(text)
            if reason:
                return self._drop(v, reason)
            v.text = text = cleaned or text
        if self.decontam is not None and (reason := self.decontam.filter(text)):
            return self._drop(v, reason)
        if self.cfg.pii != "off":
            redacted, counts = pii.redact(text)
            if counts and self.cfg.pii == "drop":
                v.pii = counts
                return self._drop(v, "pii")
            v.text, v.pii = redacted, counts
        return v

    @staticmethod
    def _drop(v: Verdict, reason: str) -> Verdict:
        v.text, v.reason = None, reason
        return v


class Histogram:
    """Counts of each score of :data:`SCORES` in fixed bins (values outside go to the end bins)."""

    def __init__(self) -> None:
        self.counts = {name: [0] * bins for name, _, _, bins in SCORES}

    def add(self, scores: dict[str, float]) -> None:
        for name, lo, hi, bins in SCORES:
            if name in scores:
                i = int((scores[name] - lo) / (hi - lo) * bins)
                self.counts[name][min(bins - 1, max(0, i))] += 1

    def merge(self, other: dict[str, list[int]]) -> None:
        for name, counts in other.items():
            mine = self.counts.setdefault(name, [0] * len(counts))
            for i, c in enumerate(counts):
                mine[i] += c

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.counts.items() if any(v)}
