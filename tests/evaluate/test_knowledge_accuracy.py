"""Factual accuracy from real generations: a tiny GPT trained here (plain torch, seconds) on the
trained facts of the elements database, asked every question of the three groups, closed-book
and grounded; and the answer rule on strings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flows.config import PipelineConfig, build
from flows.data import knowledge
from flows.evaluate.knowledge import is_correct, knowledge_accuracy, select
from flows.workdir import FingerprintCache
from gptcore import GPT, Tokenizer, preset, save_bundle
from tests.knowledge_helpers import SYMBOL, make_db, sql_source

CONTEXT = 128


@pytest.mark.parametrize(
    "expected, given, ok",
    [
        ("Si", "Si", True),
        ("si", "It is SI.", True),
        ("Si", "Silicon", False),
        ("1", "12", False),
        ("1", "number 1, then", True),
        ("Paris", "Lyon\nParis", False),
        ("Paris", "  paris ", True),
        ("Fe", "", False),
    ],
)
def test_an_answer_is_right_when_its_first_line_holds_the_expected_words(expected, given, ok):
    assert is_correct(expected, given) is ok


def _train(tok: Tokenizer, pairs: list[tuple[str, str]], steps: int = 200) -> GPT:
    """Adam on whole (prompt, completion) sequences, right-padded (padding ignored), until the tiny
    model recites them. Prompt and completion are tokenized apart, as flows/data/sft.py does."""
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, context_length=CONTEXT))
    rows = [
        tok.encode(p, allow_special=False) + tok.encode(c, allow_special=False) + [tok.eot_id]
        for p, c in pairs
    ]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.eot_id)
    targets = torch.full((len(rows), width), -1)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        targets[i, : len(r) - 1] = torch.tensor(r[1:])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(rows), (16,), generator=gen)
        _, loss = model(ids[pick], targets[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(dataset with the knowledge tables, a bundle that learned the trained facts, an untrained
    one)."""
    root = tmp_path_factory.mktemp("knowledge")
    db = make_db(root / "elements.db")
    data = build(
        PipelineConfig,
        {"data": {"knowledge": [sql_source(db, (SYMBOL,), holdout_fraction=0.2)]}},
        "<test>",
    ).data
    built = knowledge.materialize(data, root / "k", FingerprintCache(None))
    dataset = root / "dataset"
    (dataset / "knowledge").mkdir(parents=True)
    for table in built.tables:
        shutil.copyfile(table, dataset / "knowledge" / table.name)
    pairs = [json.loads(line)["messages"] for line in built.sft_train.read_text().splitlines()]
    qa = [(knowledge.question_prompt(m[0]["content"]), m[1]["content"] + "\n") for m in pairs]
    statements = [json.loads(line)["text"] for line in built.text_train.read_text().splitlines()]
    tok = Tokenizer.train([p + c for p, c in qa] + statements, vocab_size=400)
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # on a shared 2-core machine, one thread was 10x faster for this tiny model
    try:
        trained = save_bundle(root / "trained", _train(tok, qa), tok, {})
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(1)
    untrained = save_bundle(
        root / "untrained",
        GPT(preset("tiny", vocab_size=tok.vocab_size, context_length=CONTEXT)).eval(),
        tok,
        {},
    )
    return dataset, trained, untrained


def test_accuracy_per_group_from_real_generations(learned):
    dataset, trained, untrained = learned
    figures, rows = knowledge_accuracy(trained, dataset, max_new_tokens=6)
    questions = knowledge.read_jsonl(dataset / "knowledge" / "questions.jsonl")
    for mode in ("closed_book", "grounded"):
        for group in ("trained_phrasing", "heldout_phrasing", "heldout_fact"):
            mine = [r for r in rows if r["mode"] == mode and r["group"] == group]
            f = figures[mode][group]
            assert f["questions"] == len(mine) == sum(q["group"] == group for q in questions) > 0
            assert (
                f["correct"]
                == sum(r["correct"] for r in mine)
                == sum(is_correct(r["expected"], r["given"]) for r in mine)
            )
            assert f["accuracy"] == pytest.approx(f["correct"] / f["questions"])
    closed = figures["closed_book"]
    # It recites what it was trained on, and cannot know the facts it never saw.
    assert closed["trained_phrasing"]["accuracy"] >= 0.8, closed
    assert closed["heldout_fact"]["accuracy"] <= 0.2, closed
    assert closed["trained_phrasing"]["accuracy"] > closed["heldout_fact"]["accuracy"] + 0.5
    grounded = [r for r in rows if r["mode"] == "grounded"]
    assert all(r["facts_used"] for r in grounded)  # BM25 found facts for every question
    assert {r["model"] for r in rows} == {"model"}

    base, _ = knowledge_accuracy(untrained, dataset, max_new_tokens=6, per_group=10)
    assert (
        closed["trained_phrasing"]["accuracy"]
        > base["closed_book"]["trained_phrasing"]["accuracy"] + 0.5
    )


def test_a_sample_per_group_is_stable(learned):
    questions = knowledge.read_jsonl(learned[0] / "knowledge" / "questions.jsonl")
    picked = select(questions, 3)
    assert len(picked) == 9 and picked == select(list(reversed(questions)), 3)
