"""Knowledge sources: a real SQLite database, a real Turtle graph and row files in, statements,
question/answer pairs and the trained/held-out split out; read-only access; content identity; and
every bad source refused through the CLI with one line and exit 2, before any training."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import pipeline
from flows.config import PipelineConfig, build
from flows.data import knowledge, knowledge_sources
from flows.data.inputs import InputError
from flows.ops.schedule import Scheduler
from flows.workdir import FingerprintCache, sha256_file
from tests.knowledge_helpers import (
    CAPITALS,
    NUMBER,
    SYMBOL,
    elements,
    make_db,
    rdf_source,
    sql_source,
)


def _cfg(tmp_path: Path, *sources: dict, **data) -> PipelineConfig:
    raw = {
        "workdir": str(tmp_path / "w"),
        "tracking": {"enabled": False},
        "data": {"inputs": [], "sft_inputs": [], "knowledge": list(sources), **data},
    }
    return build(PipelineConfig, raw, "<test>")


def _built(tmp_path: Path, *sources: dict) -> knowledge.Built:
    return knowledge.materialize(
        _cfg(tmp_path, *sources).data, tmp_path / "k", FingerprintCache(None)
    )


@pytest.fixture
def db(tmp_path) -> Path:
    return make_db(tmp_path / "elements.db")


def test_database_rows_become_statements_pairs_and_a_stable_split(tmp_path, db):
    built = _built(tmp_path, sql_source(db, (SYMBOL, NUMBER)))
    facts, questions = (knowledge.read_jsonl(p) for p in built.tables)
    assert len(facts) == 54
    silicon = next(f for f in facts if f["fields"]["name"] == "Silicon")
    assert silicon["statements"] == [
        "The chemical symbol of Silicon is Si.",
        "Silicon has atomic number 14.",
    ]
    held = [f for f in facts if not f["trained"]]
    assert 1 <= len(held) <= 12  # holdout_fraction 0.1 of 54 rows, by hash
    # Two templates x two phrasings per fact; the last phrasing of each template is held out.
    asked = {(q["question"], q["group"]) for q in questions if q["fact"] == silicon["id"]}
    if silicon["trained"]:
        assert ("What is the chemical symbol of Silicon?", "trained_phrasing") in asked
        assert ("Which symbol stands for Silicon?", "heldout_phrasing") in asked
    assert {q["group"] for q in questions if q["fact"] in {f["id"] for f in held}} == {
        "heldout_fact"
    }

    text = [json.loads(line)["text"] for line in built.text_train.read_text().splitlines()]
    val = [json.loads(line)["text"] for line in built.text_val.read_text().splitlines()]
    for fact in held:  # a held-out fact is never trained on: its statement is validation text only
        assert not any(fact["statements"][0] in doc for doc in text)
        assert any(fact["statements"][0] in doc for doc in val)
    trained_pairs = [
        json.loads(line)["messages"] for line in built.sft_train.read_text().splitlines()
    ]
    assert len(trained_pairs) == 2 * (54 - len(held))  # one trained phrasing per template
    assert trained_pairs[0][0]["role"] == "user" and trained_pairs[0][1]["role"] == "assistant"
    assert not any("Which symbol stands for" in m[0]["content"] for m in trained_pairs)
    assert built.summary[0]["facts"] == {"trained": 54 - len(held), "held_out": len(held)}

    # The split is by row content: the same rows in another order (and one more row) split the same.
    other = make_db(
        tmp_path / "reordered.db",
        [*reversed(elements()), {"atomic_number": 55, "symbol": "Cs", "name": "Caesium"}],
    )
    again = knowledge.read_jsonl(_built(tmp_path, sql_source(other, (SYMBOL, NUMBER))).tables[0])
    split = {f["fields"]["name"]: f["trained"] for f in facts}
    assert all(
        split[f["fields"]["name"]] == f["trained"]
        for f in again
        if f["fields"]["name"] != "Caesium"
    )


def test_turtle_graph_rows_use_labels_literals_and_iri_names(tmp_path):
    facts = knowledge.read_jsonl(_built(tmp_path, rdf_source(holdout_fraction=0.0)).tables[0])
    said = {s for f in facts for s in f["statements"]}
    assert "The capital of France is Paris." in said  # rdfs:label on both sides
    assert "The capital of Kenya is Nairobi." in said  # a literal object
    assert "The capital of Peru is Lima." in said  # no label: the IRI's last part
    assert len(facts) == 11 and all(f["trained"] for f in facts)


def test_csv_and_jsonl_rows_and_nulls_skipped_and_counted(tmp_path):
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text("name,symbol\nHydrogen,H\nMystery,\nHelium,He\n")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"name": "Lithium", "symbol": "Li"}\n{"name": "Unknown", "symbol": null}\n')
    t = {
        "text": "The chemical symbol of {name} is {symbol}.",
        "ask": ["Symbol of {name}?"],
        "answer": "{symbol}",
    }
    built = _built(
        tmp_path,
        {"source": str(csv_file), "templates": [t], "holdout_fraction": 0.0},
        {"source": str(jsonl), "templates": [t], "holdout_fraction": 0.0},
    )
    facts = knowledge.read_jsonl(built.tables[0])
    assert sorted(f["fields"]["name"] for f in facts) == ["Helium", "Hydrogen", "Lithium"]
    assert [s["skipped"] for s in built.summary] == [{"null_field": 1}, {"null_field": 1}]


def test_the_database_is_only_read(tmp_path, db):
    before = sha256_file(db)
    _built(tmp_path, sql_source(db, (SYMBOL, NUMBER)))
    assert sha256_file(db) == before
    for query in (
        "DELETE FROM elements",
        "SELECT 1; DROP TABLE elements",
        "UPDATE elements SET name = 'x'",
        "INSERT INTO elements VALUES (99, 'X', 'X')",
        "PRAGMA writable_schema = 1",
    ):
        with pytest.raises(InputError, match="SELECT"):
            knowledge_sources.check_select(query, "data.knowledge[0].query")
    # Even a write past the SELECT check meets a read-only connection.
    src = build(PipelineConfig, {"data": {"knowledge": [sql_source(db)]}}, "<test>").data.knowledge[
        0
    ]
    import sqlalchemy as sa

    engine = knowledge_sources._read_only_engine(sa.engine.make_url(src.source), "test")
    with (
        engine.connect() as conn,
        pytest.raises(sa.exc.OperationalError, match="readonly|read-only"),
    ):
        conn.exec_driver_sql("DELETE FROM elements")
    engine.dispose()
    assert (
        sha256_file(db) == before
        and len(sqlite3.connect(db).execute("SELECT * FROM elements").fetchall()) == 54
    )


def test_a_changed_row_is_a_new_dataset_and_new_data_for_the_scheduler(tmp_path, db):
    cfg = _cfg(tmp_path, sql_source(db))

    def dataset_dir() -> Path:
        return next(
            p.out for p in pipeline.plan(cfg, wanted=["preprocess"]) if p.step.name == "preprocess"
        )

    first, fp = dataset_dir(), Scheduler(cfg, on_new_data=True).fingerprint()
    assert dataset_dir() == first  # unchanged rows: the same dataset
    conn = sqlite3.connect(db)
    conn.execute("UPDATE elements SET symbol = 'Xx' WHERE name = 'Iron'")
    conn.commit()
    conn.close()
    assert dataset_dir() != first
    assert Scheduler(cfg, on_new_data=True).fingerprint() != fp


def test_knowledge_beside_a_text_corpus_trains_only_the_trained_facts(tmp_path, db, ray_local):
    from flows.data.dataset import read_manifest, read_shard
    from gptcore import Tokenizer
    from tests.steps import preprocess

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(f"Note {i}: the lab keeps its samples in cabinet {i % 7}." for i in range(400))
    )
    cfg = _cfg(
        tmp_path,
        sql_source(db, (SYMBOL, NUMBER)),
        inputs=[str(corpus)],
        val_min_tokens=200,
        val_fraction=0.05,
        vocab_size=400,
    )
    out = preprocess(cfg)
    manifest = read_manifest(out)
    tok = Tokenizer.load(out / "tokenizer.json")

    def text(split: str) -> str:
        return "".join(
            tok.decode(read_shard(out, s, manifest["dtype"]).tolist())
            for s in manifest["splits"][split]["shards"]
        )

    train, val = text("train"), text("val")
    assert (
        manifest["val_assignment"]["fixed_units"] >= 1 and "Note " in val
    )  # the corpus's own val share
    facts = knowledge.read_jsonl(out / "knowledge" / "facts.jsonl")
    for f in facts:
        assert (f["statements"][0] in train) == f["trained"] and (f["statements"][0] in val) != f[
            "trained"
        ]
    assert [i["kind"] for i in manifest["inputs"]] == ["text", "knowledge"]
    assert manifest["knowledge"]["sources"][0]["facts"]["trained"] == sum(
        f["trained"] for f in facts
    )


def _preprocess(tmp_path: Path, *sources: dict) -> subprocess.CompletedProcess:
    config = tmp_path / "bad.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "workdir": str(tmp_path / "w"),
                "tracking": {"enabled": False},
                "data": {"inputs": [], "sft_inputs": [], "knowledge": list(sources)},
            }
        )
    )
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "preprocess", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _bad_sources(tmp_path: Path, db: Path) -> dict[str, tuple[dict, list[str]]]:
    text = tmp_path / "notes.db"
    text.write_text("this is not a database, only some text\n" * 20)
    broken = tmp_path / "broken.ttl"
    broken.write_text(CAPITALS.read_text() + "\nex:Chile ex:capital .\n")
    return {
        "two statements": (
            sql_source(db, query="SELECT name, symbol FROM elements; DROP TABLE elements"),
            ["data.knowledge[0].query", "2 SQL statements", "exactly one SELECT"],
        ),
        "a write": (
            sql_source(db, query="DELETE FROM elements"),
            ["delete statement, not a SELECT"],
        ),
        "a missing field": (
            sql_source(db, query="SELECT name, symbol FROM elements", templates=[NUMBER]),
            ["{atomic_number}", "not a column", "name, symbol", str(db)],
        ),
        "not a database": (sql_source(text), ["file is not a database", str(text)]),
        "unreachable": (
            sql_source(tmp_path / "gone" / "elements.db"),
            ["cannot open the database", "does not exist"],
        ),
        "no driver": (
            {**sql_source(db), "source": "postgresql://reader:s3cret@127.0.0.1:1/facts"},
            ["no driver for postgresql", "postgresql://***@127.0.0.1:1/facts"],
        ),
        "bad rdf": (rdf_source(broken), [str(broken), "does not parse as turtle"]),
        "no triples": (
            {**rdf_source(), "predicate": "http://example.org/population"},
            ["http://example.org/population has no triples", str(CAPITALS)],
        ),
        "no answer": (
            sql_source(db, templates=[{"ask": ["What is {name}?"]}]),
            ["data.knowledge[0].templates[0].answer", "missing"],
        ),
    }


CASES = (
    "two statements",
    "a write",
    "a missing field",
    "not a database",
    "unreachable",
    "no driver",
    "bad rdf",
    "no triples",
    "no answer",
)


@pytest.mark.parametrize("case", CASES)
def test_a_bad_source_is_one_line_and_exit_2_before_any_work(tmp_path, case):
    db = make_db(tmp_path / "elements.db")
    before = sha256_file(db)
    source, words = _bad_sources(tmp_path, db)[case]
    out = _preprocess(tmp_path, source)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    for word in words:
        assert word in errors[0], errors[0]
    assert "s3cret" not in out.stderr + out.stdout
    assert not (tmp_path / "w" / "preprocess").exists() or not any(
        (tmp_path / "w" / "preprocess").glob("*/DONE")
    )
    assert sha256_file(db) == before
