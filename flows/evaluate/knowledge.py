"""Factual accuracy: how many questions about a dataset's knowledge sources a model answers right.

What it is: :func:`knowledge_accuracy`, which asks a model bundle (any: the evaluated model, its
base, a champion) every question of a dataset's ``knowledge/questions.jsonl`` with greedy decoding,
closed-book and grounded (the facts BM25 retrieves put in the prompt, as ``serve.knowledge`` does),
and scores it per group: trained facts in trained phrasings, trained facts in the held-out
phrasing, held-out facts (see flows/data/knowledge.py). :func:`is_correct` is the rule: the answer
(its first line) contains the expected value, word-bounded and case-insensitive, so "Si" is not
found in "Silicon" and "1" not in "12".

What it is not: the stage (stage.py writes metrics.json and logs to MLflow), nor a benchmark of
general ability. Held-out facts measure guessing: a model that learned the facts, not the task of
answering, stays near its base there.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows.data.knowledge import GROUPS, question_prompt, read_jsonl
from flows.serve.grounding import Grounder

QUESTIONS = Path("knowledge") / "questions.jsonl"
MODES = ("closed_book", "grounded")
TABLE_COLUMNS = ("model", "mode", "group", "question", "expected", "given", "correct", "facts_used")
_BATCH = 16  # questions decoded together


def has_knowledge(dataset: Path) -> bool:
    return (Path(dataset) / QUESTIONS).is_file()


def is_correct(expected: str, given: str) -> bool:
    """`given`'s first line contains `expected` as whole words, ignoring case."""
    want = expected.strip()
    first = given.strip().split("\n", 1)[0] if given.strip() else ""
    return (
        bool(want)
        and re.search(rf"(?<!\w){re.escape(want)}(?!\w)", first, re.IGNORECASE) is not None
    )


def select(questions: Sequence[dict[str, Any]], per_group: int) -> list[dict[str, Any]]:
    """At most `per_group` questions of each group (0: all), the lowest by a hash of their text."""
    if per_group <= 0:
        return list(questions)
    out = []
    for group in GROUPS:
        members = [q for q in questions if q["group"] == group]
        members.sort(key=lambda q: hashlib.blake2b(q["question"].encode(), digest_size=8).digest())
        out += members[:per_group]
    return out


def answers(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy answers, up to the end of text or the end of the line."""
    from gptcore import generate

    out: list[str] = []
    T = model.config.context_length
    for i in range(0, len(prompts), _BATCH):
        batch = [
            tokenizer.encode(p, allow_special=False)[-(T - max_new_tokens) :]
            for p in prompts[i : i + _BATCH]
        ]
        new = generate(
            model,
            batch,
            max_new_tokens,
            stop_ids=(tokenizer.eot_id,),
            stop_strings=("\n",),
            tokenizer=tokenizer,
            pack_weights=False,
        )
        out += [tokenizer.decode(ids) for ids in new]
    return out


def knowledge_accuracy(
    bundle: str | Path,
    dataset: str | Path,
    max_new_tokens: int = 16,
    per_group: int = 0,
    top_k: int = 3,
    name: str = "model",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy of the model in `bundle` on the questions of `dataset`: figures per mode and group
    ({"closed_book": {"trained_phrasing": {"accuracy", "correct", "questions"}, ...},
    "grounded": ...}) and the table rows (every question, expected and given answer; `name` fills
    the model column)."""
    import torch

    from gptcore import load_bundle

    model, tokenizer, _ = load_bundle(bundle, device="cuda" if torch.cuda.is_available() else "cpu")
    questions = select(read_jsonl(Path(dataset) / QUESTIONS), per_group)
    grounder = Grounder.from_dataset(dataset)
    used = [grounder.retrieve(q["question"], top_k) for q in questions]
    prompts = {
        "closed_book": [question_prompt(q["question"]) for q in questions],
        "grounded": [
            question_prompt(q["question"], [f["text"] for f in u])
            for q, u in zip(questions, used, strict=True)
        ],
    }
    figures: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for mode in MODES:
        given = answers(model, tokenizer, prompts[mode], max_new_tokens)
        counts = {g: [0, 0] for g in GROUPS}
        for q, a, u in zip(questions, given, used, strict=True):
            ok = is_correct(q["expected"], a)
            counts[q["group"]][0] += ok
            counts[q["group"]][1] += 1
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "group": q["group"],
                    "question": q["question"],
                    "expected": q["expected"],
                    "given": a.strip(),
                    "correct": ok,
                    "facts_used": " | ".join(f["id"] for f in u) if mode == "grounded" else "",
                }
            )
        figures[mode] = {
            g: {"accuracy": c / n if n else None, "correct": c, "questions": n}
            for g, (c, n) in counts.items()
        }
    return figures, rows


def flat(figures: dict[str, Any], prefix: str) -> dict[str, float]:
    """MLflow metrics of :func:`knowledge_accuracy`'s figures:
    ``<prefix>.<mode>.<group>.accuracy``."""
    return {
        f"{prefix}.{mode}.{group}.accuracy": v["accuracy"]
        for mode, groups in figures.items()
        for group, v in groups.items()
        if v["accuracy"] is not None
    }


def summary_lines(figures: dict[str, Any], base: dict[str, Any] | None = None) -> list[str]:
    """The printed table: per group, closed-book and grounded accuracy (and the base's)."""
    lines = [
        "  knowledge (greedy answer contains the expected value): closed-book / grounded"
        + (" (base: closed-book / grounded)" if base else "")
    ]

    def pair(f: dict[str, Any], group: str) -> str:
        return " / ".join(_pct(f[m][group]) for m in MODES)

    for group in GROUPS:
        n = figures[MODES[0]][group]["questions"]
        line = f"    {group.replace('_', ' ')} ({n} questions): {pair(figures, group)}"
        if base:
            line += f" (base: {pair(base, group)})"
        lines.append(line)
    return lines


def _pct(v: dict[str, Any]) -> str:
    return "-" if v["accuracy"] is None else f"{100 * v['accuracy']:.0f}%"
