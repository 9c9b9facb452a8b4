"""Language identification of one document, with the model inside its wheel (pycld2, CLD2).

What it is: :func:`identify` (ISO 639-1 code and score of a text's main language) and
:class:`LanguageFilter` (keep documents in the given languages at a minimum score). Chosen by
measurement on short multilingual chat texts (tests/data/curate/multilingual.jsonl, 150 messages
in 14 languages): pycld2 8.5 us a message and 98.7 % correct, py3langid 107 us and 98.7 %, langid
574 us and 96.0 % (README, "Curation"). CLD2's score is the share of the text's bytes in the top
language; text it cannot place is ``un`` with score 0.

What it is not: Ray or I/O. No model is downloaded at run time (fastText's lid.176 would be).
"""

from __future__ import annotations

from dataclasses import dataclass

import pycld2

UNKNOWN = "un"


def identify(text: str) -> tuple[str, float]:
    """(language code, score in [0, 1]) of `text`'s main language; ("un", 0.0) when unknown."""
    try:
        reliable, _, details = pycld2.detect(text)
    except pycld2.error:  # CLD2 refuses some byte sequences (e.g. rare control characters)
        return UNKNOWN, 0.0
    code, percent = details[0][1], details[0][2]
    if code == UNKNOWN or not percent:
        return UNKNOWN, 0.0
    return code.split("-")[0], percent / 100.0  # zh-Hant -> zh


@dataclass(frozen=True)
class LanguageFilter:
    """Keep documents whose main language is one of `languages` (empty keeps all) with at least
    `min_score` of the text in it."""

    languages: tuple[str, ...] = ()
    min_score: float = 0.5

    def filter(self, text: str) -> str | None:
        return self.verdict(text)[0]

    def verdict(self, text: str) -> tuple[str | None, str, float]:
        """(reason or None, language, score)."""
        code, score = identify(text)
        if self.languages and (code not in self.languages or score < self.min_score):
            return f"language.{code}", code, score
        return None, code, score
