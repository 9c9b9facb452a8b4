"""Grounding answers on a model's knowledge sources: BM25 retrieval over the verbalised facts.

What it is: :class:`Grounder`, built from a dataset's ``knowledge/facts.jsonl`` (written by the
preprocess stage, see flows/data/knowledge.py), which ranks the facts against a question with Okapi
BM25 (the ``rank-bm25`` library) and returns the best few; :func:`ground_messages`, which puts
them into a chat request as a system turn. Serving (``serve.knowledge: true``) and evaluation
(grounded accuracy) share both, so the figure evaluate reports is the behaviour served.

What it is not: a vector store or an index that updates: the facts are those of the dataset the
model was trained on, read once when a replica loads the model. No Ray, no HTTP here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_WORD = re.compile(r"\w+")
FACTS = Path("knowledge") / "facts.jsonl"


def words(text: str) -> list[str]:
    """BM25's terms: lower-cased word characters (so "Silicon?" matches "Silicon.")."""
    return _WORD.findall(text.lower())


def fact_text(fact: dict[str, Any]) -> str:
    """What a fact says: its statements, or, when its templates have none, its fields."""
    if fact.get("statements"):
        return " ".join(fact["statements"])
    return "; ".join(f"{k}: {v}" for k, v in fact["fields"].items() if v is not None)


class Grounder:
    """BM25 over the facts of one dataset."""

    def __init__(self, facts: Sequence[dict[str, Any]]):
        from rank_bm25 import BM25Okapi

        if not facts:
            raise ValueError("no facts to ground answers on")
        self.facts = list(facts)
        self._texts = [fact_text(f) for f in self.facts]
        self._bm25 = BM25Okapi([words(t) or [""] for t in self._texts])

    @classmethod
    def from_dataset(cls, dataset: str | Path) -> Grounder:
        """The grounder of a dataset directory; ValueError naming the file when it has no
        knowledge."""
        path = Path(dataset) / FACTS
        if not path.is_file():
            raise ValueError(
                f"{path} does not exist: the dataset {dataset} has no knowledge sources "
                "(data.knowledge) to ground answers on"
            )
        return cls(
            [
                json.loads(line)
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()
            ]
        )

    def retrieve(self, question: str, k: int) -> list[dict[str, Any]]:
        """The `k` facts that match `question` best (none that share no term with it), best first:
        each {"id", "source", "text", "score"}."""
        terms = words(question)
        if not terms:
            return []
        scores = self._bm25.get_scores(terms)
        best = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
        return [
            {
                "id": self.facts[i]["id"],
                "source": self.facts[i]["source"],
                "text": self._texts[i],
                "score": round(float(scores[i]), 4),
            }
            for i in best
            if scores[i] > 0
        ]


def ground_messages(
    messages: list[dict[str, Any]], grounder: Grounder, k: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`messages` with the facts that match its last user turn as a first system turn, and those
    facts."""
    question = next(
        (
            m.get("content")
            for m in reversed(messages)
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
        ),
        None,
    )
    used = grounder.retrieve(question, k) if question else []
    if not used:
        return messages, []
    system = {"role": "system", "content": "Facts:\n" + "\n".join(f["text"] for f in used)}
    return [system, *messages], used
