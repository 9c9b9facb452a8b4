"""The evaluate stage: its checks, what it writes, what it skips (and says so), what it tracks."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from flows.config import EvaluateConfig, TrackingConfig
from flows.evaluate.stage import evaluate
from flows.tracking import stage_run
from gptcore import Tokenizer

QUICK = EvaluateConfig(
    batch_size=4, prompts=("The ", "A dog"), max_new_tokens=8, sample_tokens=16, worst_tokens=5
)
ARTIFACTS = (
    "metrics.json",
    "generations.json",
    "generations.txt",
    "loss_heatmap.html",
    "loss_heatmap.png",
    "attention.png",
    "worst_tokens.md",
    "worst_tokens.csv",
    "worst_tokens.json",
    "task_answers.jsonl",
)


@pytest.fixture(scope="module")
def evaluated(trained_bundle, dataset, tmp_path_factory):
    return evaluate(QUICK, trained_bundle, dataset, tmp_path_factory.mktemp("evaluated"))


def test_writes_metrics_generations_and_pictures(evaluated):
    assert sorted(p.name for p in evaluated.iterdir()) == sorted(ARTIFACTS)
    m = json.loads((evaluated / "metrics.json").read_text())
    assert m["notes"] == {} and m["context_length"] == 32 and isinstance(m["smoke_passed"], bool)
    assert (
        0 < m["val_loss"] < m["sft_val_loss"] + 10
        and m["val_perplexity"] > 1
        and m["val_tokens"] > 0
    )
    assert m["val_bits_per_byte"] > 0 and m["sft_val_tokens"] > 0
    assert m["task_examples"] > 0 and 0 <= m["task_score"] <= 1 and "base" not in m  # no base given
    gens = json.loads((evaluated / "generations.json").read_text())
    assert (
        gens["smoke_passed"] == m["smoke_passed"] == all(g["passed"] for g in gens["generations"])
    )
    assert [g["prompt"] for g in gens["generations"]] == list(QUICK.prompts)
    assert "--- 'A dog'" in (evaluated / "generations.txt").read_text()
    assert not (evaluated / "DONE").exists()  # the pipeline runner writes it, not the stage
    worst = json.loads((evaluated / "worst_tokens.json").read_text())
    assert len(worst) == QUICK.worst_tokens


def test_a_bundle_with_another_tokenizer_is_refused_naming_both_files(
    dataset, make_bundle, texts, tmp_path
):
    bundle = make_bundle(Tokenizer.train(texts(50, 9), vocab_size=290))
    with pytest.raises(ValueError, match="tokenizer mismatch") as err:
        evaluate(QUICK, bundle, dataset, tmp_path / "out")
    assert str(bundle / "tokenizer.json") in str(err.value) and str(
        dataset / "tokenizer.json"
    ) in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_an_incomplete_bundle_or_dataset_is_refused_naming_the_file(
    trained_bundle, dataset, tmp_path
):
    partial = shutil.copytree(trained_bundle, tmp_path / "partial")
    (partial / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        evaluate(QUICK, partial, dataset, tmp_path / "out")
    with pytest.raises(ValueError, match="manifest.json"):
        evaluate(QUICK, trained_bundle, tmp_path, tmp_path / "out")


def test_missing_splits_are_skipped_with_a_reason_not_a_crash(
    trained_bundle, make_dataset, texts, tmp_path
):
    empty_sft = make_dataset(val=texts(4, 5), sft_val=[])  # the split is there, with no tokens
    m = json.loads(
        (evaluate(QUICK, trained_bundle, empty_sft, tmp_path / "a") / "metrics.json").read_text()
    )
    assert "val_loss" in m and "sft_val_loss" not in m and "sft_val" in m["notes"]["sft_val_loss"]

    nothing = make_dataset()  # a train split only
    out = evaluate(dataclasses.replace(QUICK, prompts=()), trained_bundle, nothing, tmp_path / "b")
    m = json.loads((out / "metrics.json").read_text())
    assert not {"val_loss", "val_bits_per_byte", "sft_val_loss"} & set(m)
    assert set(m["notes"]) == {"val_loss", "sft_val_loss", "explain", "smoke_passed"}
    assert m["smoke_passed"] is None  # nothing generated: not checked, never a vacuous pass
    assert (out / "generations.json").is_file() and not (out / "attention.png").exists()


def test_context_length_is_checked_against_the_model(trained_bundle, dataset, tmp_path):
    with pytest.raises(ValueError, match="context_length=64"):
        evaluate(EvaluateConfig(context_length=64), trained_bundle, dataset, tmp_path)


def test_metrics_and_artifacts_land_on_the_mlflow_run(
    trained_bundle, dataset, tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with stage_run(TrackingConfig(enabled=True, uri=uri), tmp_path, "evaluate") as tracker:
        out = evaluate(QUICK, trained_bundle, dataset, tmp_path / "out", tracker)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    written = json.loads((out / "metrics.json").read_text())
    for key in ("val_loss", "val_perplexity", "val_bits_per_byte", "val_tokens", "sft_val_loss"):
        assert run.data.metrics[key] == pytest.approx(written[key])
    assert run.data.metrics["smoke_passed"] == float(written["smoke_passed"])
    assert {a.path for a in client.list_artifacts(tracker.run_id)} == set(ARTIFACTS)
    local = client.download_artifacts(tracker.run_id, "attention.png", str(tmp_path / "dl"))
    assert open(local, "rb").read() == (out / "attention.png").read_bytes()
