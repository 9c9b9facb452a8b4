"""Task scores on the held-out fine-tuning pairs: does the model answer what it was tuned to answer?

What it is: the held-out examples of the ``sft_val`` split read back as (prompt ids, reference
answer) -- the prompt is every token before the first trained one (the template's header of the
assistant turn included), the reference the first trained run, its end-of-turn token dropped --,
the model's greedy answers to them, and the scores: exact match and contains (the normalised
reference inside the answer) for short answers, ROUGE-L F1 and token F1 (SQuAD's bag-of-words
overlap) for longer ones. ``task_score`` is, per example, contains for a short reference
(at most ``SHORT_WORDS`` words) and ROUGE-L for a longer one, averaged.

What it is not: a benchmark suite. Same examples, same greedy decoding: the figures compare a tuned
model with its base (or a champion) on the same data, reproducibly. The scoring functions are pure
functions of strings, tested without a model.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flows.evaluate.metrics import split_examples, split_shards

SHORT_WORDS = 5
"""A reference of at most this many words is a short answer: scored by exact match / contains."""
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


@dataclass(frozen=True)
class Pair:
    """One held-out example: what the model is shown and what it should answer."""

    prompt_ids: list[int]
    reference: str


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed (SQuAD's normalisation, articles
    kept)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def contains(answer: str, reference: str) -> float:
    ref = normalize(reference)
    return float(bool(ref) and f" {ref} " in f" {normalize(answer)} ")


def token_f1(answer: str, reference: str) -> float:
    """F1 of the word multisets (SQuAD's token F1)."""
    a, r = normalize(answer).split(), normalize(reference).split()
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if not common:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of words, as precision and recall's harmonic
    mean."""
    a, r = normalize(answer).split(), normalize(reference).split()
    if not a or not r:
        return float(a == r)
    prev = [0] * (len(r) + 1)
    for x in a:  # LCS by dynamic programming, one row at a time
        row = [0]
        for j, y in enumerate(r):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def score_answer(answer: str, reference: str) -> dict[str, float]:
    """Every score of one answer, and ``score``: contains when the reference is short, else
    ROUGE-L."""
    scores = {
        "exact_match": exact_match(answer, reference),
        "contains": contains(answer, reference),
        "token_f1": token_f1(answer, reference),
        "rouge_l": rouge_l(answer, reference),
    }
    short = len(normalize(reference).split()) <= SHORT_WORDS
    return scores | {"score": scores["contains"] if short else scores["rouge_l"]}


def heldout_pairs(
    dataset: Path,
    manifest: dict[str, Any],
    tokenizer: Any,
    max_examples: int,
    split: str = "sft_val",
) -> list[Pair]:
    """The first `max_examples` held-out examples (0: all) with a trained run, as (prompt,
    reference)."""
    eot = int(manifest["eot_id"])
    stops = set(tokenizer.stop_ids)
    pairs: list[Pair] = []
    for shard, tokens, mask in split_shards(dataset, manifest, split, masked=True):
        for start, end in split_examples(
            dataset / shard["file"], tokens, eot, shard.get("examples")
        ):
            m = np.asarray(mask[start:end]) > 0
            trained = np.flatnonzero(m[:-1])  # the example's closing <|endoftext|> is no answer
            if not len(trained):
                continue
            first = int(trained[0])
            last = first
            while last + 1 < len(m) - 1 and m[last + 1]:
                last += 1
            ids = [int(t) for t in tokens[start:end]]
            answer = [t for t in ids[first : last + 1] if t not in stops]
            pairs.append(Pair(ids[:first], tokenizer.decode(answer).strip()))
            if max_examples and len(pairs) >= max_examples:
                return pairs
    return pairs


def answers(
    model: Any, tokenizer: Any, pairs: Sequence[Pair], max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """Greedy answers to the pairs' prompts, each ending at the model's first stop token."""
    from gptcore import generate

    out: list[str] = []
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i : i + batch_size]
        # Answers need not run longer than the longest reference by much: that bounds the decoding.
        budget = min(max_new_tokens, max(len(tokenizer.encode(p.reference)) for p in batch) + 8)
        ids = generate(
            model, [p.prompt_ids for p in batch], max_new_tokens=budget, stop_ids=tokenizer.stop_ids
        )
        out += [tokenizer.decode(row).strip() for row in ids]
    return out


def task_figures(
    model: Any, tokenizer: Any, pairs: Sequence[Pair], max_new_tokens: int, batch_size: int = 8
) -> tuple[dict[str, float], list[str]]:
    """(mean scores as ``task_*`` figures, the answers) of a model on the pairs."""
    texts = answers(model, tokenizer, pairs, max_new_tokens, batch_size)
    scores = [score_answer(a, p.reference) for a, p in zip(texts, pairs, strict=True)]
    figures = (
        {f"task_{k}": float(np.mean([s[k] for s in scores])) for k in scores[0]} if scores else {}
    )
    return figures | {"task_examples": len(pairs)}, texts
