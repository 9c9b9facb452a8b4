"""Decontamination: find training documents that share a word 13-gram with an evaluation set.

What it is: :func:`load_ngrams` (the hashed n-grams of evaluation files: JSONL records -- every
string value in them --, JSON arrays, or text files, one document per line) and
:class:`Decontaminator` (whether one document shares an n-gram with them). The n-gram is over
lowercased words with punctuation stripped, as GPT-3's and Llama's contamination checks do; hashes
are 64-bit xxhash values held in one sorted numpy array (8 bytes an n-gram), searched with
``np.isin``.

What it is not: Ray, or a choice of which files are evaluation sets (``data.curate.decontaminate``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xxhash

from flows.data.curate.quality import words_of


class DecontamError(ValueError):
    """An evaluation file that cannot be read; the message names it."""


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """uint64 hashes of `text`'s word n-grams (a text of fewer words: one hash of all of them)."""
    words = [w for w in words_of(text) if w]
    if not words:
        return np.zeros(0, dtype=np.uint64)
    if len(words) < n:
        grams = [" ".join(words)]
    else:
        grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(g.encode()) for g in grams), dtype=np.uint64, count=len(grams)
    )


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def eval_texts(path: str | Path) -> Iterator[str]:
    """The texts of one evaluation file: .jsonl / .json (every string in it) or plain text lines."""
    p = Path(path)
    try:
        if p.suffix == ".json":
            yield from _strings(json.loads(p.read_text(encoding="utf-8")))
            return
        with open(p, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if p.suffix == ".jsonl":
                    try:
                        yield from _strings(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DecontamError(
                            f"data.curate.decontaminate: {p}:{number}: not JSON ({e.msg})"
                        ) from None
                else:
                    yield line
    except (OSError, UnicodeDecodeError) as e:
        raise DecontamError(f"data.curate.decontaminate: cannot read {p}: {e}") from None
    except json.JSONDecodeError as e:
        raise DecontamError(f"data.curate.decontaminate: {p}: not JSON ({e.msg})") from None


def load_ngrams(paths: tuple[str, ...], n: int) -> np.ndarray:
    """Sorted unique hashes of every n-gram of the evaluation files."""
    parts = [ngram_hashes(t, n) for p in paths for t in eval_texts(p)]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


class Decontaminator:
    """Drop a document sharing any word `n`-gram with the evaluation n-grams
    (``decontaminated``)."""

    def __init__(self, ngrams: np.ndarray, n: int = 13) -> None:
        self.ngrams, self.n = ngrams, n

    def filter(self, text: str) -> str | None:
        if not len(self.ngrams):
            return None
        return "decontaminated" if np.isin(ngram_hashes(text, self.n), self.ngrams).any() else None
