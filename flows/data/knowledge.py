"""Knowledge put into words as training data: statements, question/answer pairs, held-out facts.

What it is: every row of each ``data.knowledge`` source (read by flows/data/knowledge_sources.py)
is verbalised by its templates into statements (pretraining text) and question/answer pairs
(fine-tuning records), and the rows are split by a stable hash into trained and held-out facts.
:func:`materialize` writes what the preprocess stage reads as ordinary inputs (JSONL files of
documents and of chat records) plus the tables evaluation and serving read (``facts.jsonl``,
``questions.jsonl``, read back with :func:`read_jsonl`).

The three groups evaluation reports come from here: a trained fact's questions in the phrasings
trained on (``trained_phrasing``), the last ``ask`` of each template, which is never trained on
(``heldout_phrasing``), and every question about a held-out fact (``heldout_fact``), whose
statements and pairs are never trained on either (they go to the ``val`` and ``sft_val`` splits).

What it is not: reading the sources (flows/data/knowledge_sources.py), nor tokenizing or sharding
(the stage does that to the files written here). A row whose templated field is NULL is skipped
and counted; a source that gives no usable row raises :class:`InputError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows.config import DataConfig, KnowledgeSource, stable_hash, to_dict
from flows.data.inputs import InputError
from flows.data.knowledge_sources import (
    fingerprint,
    kind,
    label,
    read_rows,
    row_hash,
    template_fields,
)
from flows.data.sft import ASSISTANT, render_chat_prompt
from flows.workdir import FingerprintCache, atomic_write_text

log = logging.getLogger(__name__)

GROUPS = ("trained_phrasing", "heldout_phrasing", "heldout_fact")
"""Evaluation's three groups: trained facts in trained phrasings, trained facts in the held-out
phrasing, held-out facts (any phrasing)."""
_DOC_CHARS = (
    1000  # statements are packed into documents of about this size (min_chars drops short ones)
)


# --------------------------------------------------------------------------- the chat seam


def qa_record(question: str, answer: str) -> dict[str, Any]:
    """The fine-tuning record of one question/answer pair, in the chat format of flows/data/sft.py
    (the model's own chat template takes over there when it has one)."""
    return {
        "messages": [{"role": "user", "content": question}, {"role": ASSISTANT, "content": answer}]
    }


def question_prompt(question: str, facts: Sequence[str] = ()) -> str:
    """What the model is asked: the question as a chat turn, after a system turn with `facts`
    (grounded)."""
    turns = [{"role": "system", "content": "Facts:\n" + "\n".join(facts)}] if facts else []
    return render_chat_prompt([*turns, {"role": "user", "content": question}])


# --------------------------------------------------------------------------- verbalising


@dataclasses.dataclass
class Built:
    """What :func:`materialize` wrote: inputs for the stage and the tables for
    evaluation/serving."""

    root: Path
    text_train: Path | None  # documents of trained facts' statements (JSONL)
    text_val: Path | None  # held-out facts' statements: the val split, never trained on
    sft_train: Path | None  # chat records of trained facts in trained phrasings
    sft_val: Path | None  # every other pair: the sft_val split
    summary: list[dict[str, Any]]
    fingerprints: list[dict[str, Any]]  # per source, as :func:`fingerprint` gives them

    @property
    def tables(self) -> tuple[Path, Path]:
        return self.root / "facts.jsonl", self.root / "questions.jsonl"


def _held_out(h: str, fraction: float) -> bool:
    return int(h[:16], 16) < fraction * (1 << 64)


def verbalise(
    src: KnowledgeSource, index: int, columns: list[str], rows: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Counter]:
    """(facts, questions, skipped counts) of one source's rows, in row-hash order."""
    fields = template_fields(src)
    skipped: Counter = Counter()
    facts: list[dict[str, Any]] = []
    questions: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row in sorted(rows, key=row_hash):
        h = row_hash(row)
        if any(row.get(f) is None for f in fields):
            skipped["null_field"] += 1
            continue
        if h in seen:  # the same row twice is one fact
            skipped["duplicate_row"] += 1
            continue
        seen.add(h)
        values = {k: _text(v) for k, v in row.items()}
        trained = not _held_out(h, src.holdout_fraction)
        statements = [t.text.format_map(values) for t in src.templates if t.text]
        fact_id = f"{index}:{h[:16]}"
        facts.append(
            {
                "id": fact_id,
                "source": index,
                "trained": trained,
                "statements": statements,
                "fields": {c: values.get(c) for c in columns if c in values},
            }
        )
        for t in src.templates:
            answer = t.answer.format_map(values)
            for j, ask in enumerate(t.ask):
                last = j == len(t.ask) - 1 and len(t.ask) > 1
                group = GROUPS[2] if not trained else GROUPS[1] if last else GROUPS[0]
                questions.append(
                    {
                        "fact": fact_id,
                        "source": index,
                        "group": group,
                        "question": ask.format_map(values),
                        "expected": answer,
                    }
                )
    return facts, questions, skipped


def _text(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _documents(statements: list[str]) -> list[str]:
    """Statements packed into documents of about _DOC_CHARS characters, one statement a line."""
    docs, current, size = [], [], 0
    for s in statements:
        if current and size + len(s) > _DOC_CHARS:
            docs.append("\n".join(current))
            current, size = [], 0
        current.append(s)
        size += len(s) + 1
    if current:
        docs.append("\n".join(current))
    return docs


def materialize(data: DataConfig, root: Path, cache: FingerprintCache) -> Built:
    """Read and verbalise every source into `root`/<hash of the sources' content and templates>/;
    an existing complete directory (its summary.json written last) is reused."""
    prints = fingerprint(data, cache)
    identity = stable_hash([to_dict(s) for s in data.knowledge], prints, data.text_field)
    out = Path(root) / identity
    done = out / "summary.json"
    if not done.is_file():
        _write(data, out)
    summary = json.loads(done.read_text(encoding="utf-8"))

    def present(name: str) -> Path | None:
        return out / name if (out / name).is_file() else None

    return Built(
        out,
        present("text_train.jsonl"),
        present("text_val.jsonl"),
        present("sft_train.jsonl"),
        present("sft_val.jsonl"),
        summary,
        prints,
    )


def _write(data: DataConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    facts: list[dict[str, Any]] = []
    questions: list[dict[str, Any]] = []
    summary = []
    for i, src in enumerate(data.knowledge):
        columns, rows = read_rows(src, f"data.knowledge[{i}]")
        f, q, skipped = verbalise(src, i, columns, rows)
        if not f:
            raise InputError(
                f"data.knowledge[{i}]: {label(src)} gave no usable row ({len(rows)} rows; "
                f"skipped: {dict(skipped) or 'none'})"
            )
        if skipped:
            log.warning("data.knowledge[%d] (%s): skipped %s", i, label(src), dict(skipped))
        facts += f
        questions += q
        summary.append(
            {
                "source": label(src),
                "kind": kind(src, f"data.knowledge[{i}]"),
                "rows": len(rows),
                "skipped": dict(sorted(skipped.items())),
                "facts": {
                    "trained": sum(x["trained"] for x in f),
                    "held_out": sum(not x["trained"] for x in f),
                },
                "statements": sum(len(x["statements"]) for x in f),
                "questions": {g: sum(x["group"] == g for x in q) for g in GROUPS},
            }
        )
    trained = {x["id"] for x in facts if x["trained"]}
    field = data.text_field
    for name, wanted in (("text_train.jsonl", True), ("text_val.jsonl", False)):
        docs = _documents([s for x in facts if x["trained"] == wanted for s in x["statements"]])
        if docs:
            atomic_write_text(
                out / name, "".join(json.dumps({field: d}, ensure_ascii=False) + "\n" for d in docs)
            )
    for name, wanted in (("sft_train.jsonl", True), ("sft_val.jsonl", False)):
        records = [
            qa_record(q["question"], q["expected"])
            for q in questions
            if (q["group"] == GROUPS[0] and q["fact"] in trained) == wanted
        ]
        if records:
            atomic_write_text(
                out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            )
    atomic_write_text(
        out / "facts.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in facts)
    )
    atomic_write_text(
        out / "questions.jsonl",
        "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in questions),
    )
    atomic_write_text(
        out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n"
    )  # last: complete


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A facts.jsonl or questions.jsonl table."""
    return [
        json.loads(line)
        for line in Path(path).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
