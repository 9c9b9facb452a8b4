"""From scratch with knowledge sources alone: `gptflow run` on a SQLite database and a Turtle graph
(default data settings, tiny preset, a few steps) through preprocess, pretrain, finetune and
evaluate, with the factual accuracy of the model and its base in metrics.json, MLflow, the printed
summary and the answers table -- and the database file unchanged."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.workdir import sha256_file
from tests.knowledge_helpers import NUMBER, SYMBOL, make_db, rdf_source, sql_source

pytestmark = pytest.mark.slow

GROUPS = ("trained_phrasing", "heldout_phrasing", "heldout_fact")


def test_a_pipeline_of_knowledge_alone_runs_end_to_end(tmp_path):
    from mlflow.tracking import MlflowClient

    db = make_db(tmp_path / "elements.db")
    before = sha256_file(db)
    config = tmp_path / "knowledge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "workdir": str(tmp_path / "w"),
                "data": {
                    "inputs": [],
                    "sft_inputs": [],
                    "knowledge": [sql_source(db, (SYMBOL, NUMBER)), rdf_source()],
                },
                "model": {"preset": "tiny"},
                "pretrain": {
                    "steps": 20,
                    "micro_batch_size": 8,
                    "eval_every": 20,
                    "checkpoint_every": 20,
                },
                "finetune": {
                    "steps": 20,
                    "micro_batch_size": 8,
                    "eval_every": 20,
                    "checkpoint_every": 20,
                },
                "evaluate": {
                    "max_new_tokens": 4,
                    "sample_tokens": 16,
                    "knowledge_max_new_tokens": 6,
                },
                "registry": {"enabled": False},
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert sha256_file(db) == before  # read, never written

    dataset = next((tmp_path / "w" / "preprocess").glob("*/manifest.json")).parent
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert (
        manifest["val_assignment"]["mode"] == "fixed"
    )  # the held-out facts' statements, whatever the size
    assert manifest["splits"]["val"]["tokens"] > 0 and manifest["splits"]["sft_val"]["examples"] > 0
    assert [i["kind"] for i in manifest["inputs"]] == ["knowledge", "knowledge"]
    assert manifest["inputs"][0]["content"]["rows"] == 54

    evaluated = next((tmp_path / "w" / "evaluate").glob("*/metrics.json")).parent
    metrics = json.loads((evaluated / "metrics.json").read_text())
    questions = [
        json.loads(line)
        for line in (dataset / "knowledge" / "questions.jsonl").read_text().splitlines()
    ]
    for figures in (metrics["knowledge"], metrics["base"]["knowledge"]):
        for mode in ("closed_book", "grounded"):
            assert [figures[mode][g]["questions"] for g in GROUPS] == [
                sum(q["group"] == g for q in questions) for g in GROUPS
            ]
    assert (
        Path(metrics["base"]["bundle"]).parent.name == "pretrain"
    )  # the fine-tune's parent is its base
    with (evaluated / "knowledge_answers.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * len(questions)  # model and base, closed-book and grounded
    model_closed = [r for r in rows if r["model"] == "model" and r["mode"] == "closed_book"]
    assert (
        sum(r["correct"] == "True" for r in model_closed if r["group"] == "trained_phrasing")
        == metrics["knowledge"]["closed_book"]["trained_phrasing"]["correct"]
    )

    assert (
        "knowledge (greedy answer contains the expected value): closed-book / grounded"
        in out.stdout
    )
    assert (
        "trained phrasing (" in out.stdout
        and str(evaluated / "knowledge_answers.csv") in out.stdout
    )

    client = MlflowClient(f"sqlite:///{(tmp_path / 'w' / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("gptflow").experiment_id])
    logged = {k for r in runs for k in r.data.metrics}
    assert {
        f"{p}.{m}.{g}.accuracy"
        for p in ("knowledge", "base.knowledge")
        for m in ("closed_book", "grounded")
        for g in GROUPS
    } <= logged
