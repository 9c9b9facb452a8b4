"""MLflow seam: real sqlite stores in temp dirs; nesting, logging, and one store per workdir."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from flows.config import TrackingConfig
from flows.tracking import attach, stage_run, tracking_uri


@pytest.fixture(autouse=True)
def _no_env_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_stage_runs_nest_log_and_land_in_the_workdir_store(tmp_path):
    cfg = TrackingConfig()
    with stage_run(cfg, tmp_path, "pipeline") as parent:
        with stage_run(cfg, tmp_path, "preprocess", {"data": {"vocab_size": 300}}) as child:
            child.log_metrics({"docs": 3.0}, step=1)
            child.log_dict({"a": 1}, "manifest.json")
            attach(child.run_id, child.uri).log_metrics({"from_worker": 2.0})
    assert tracking_uri(cfg, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    client = MlflowClient(tracking_uri=tracking_uri(cfg, tmp_path))
    run = client.get_run(child.run_id)
    assert run.data.params["data.vocab_size"] == "300"
    assert run.data.metrics == {"docs": 3.0, "from_worker": 2.0}
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(child.run_id)] == ["manifest.json"]
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts under the workdir, not ./mlruns


def test_failed_stage_marks_run_failed_and_reraises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run(TrackingConfig(), tmp_path, "train") as t:
            raise RuntimeError("boom")
    client = MlflowClient(tracking_uri=tracking_uri(TrackingConfig(), tmp_path))
    assert client.get_run(t.run_id).info.status == "FAILED"


def test_each_workdir_keeps_its_own_store(tmp_path):
    """MLflow 3's set_tracking_uri exports MLFLOW_TRACKING_URI; that must not leak to the next
    stage."""
    a, b = tmp_path / "a", tmp_path / "b"
    with stage_run(TrackingConfig(), a, "one") as first:
        pass
    with stage_run(TrackingConfig(), b, "two") as second:
        pass
    assert first.uri != second.uri
    assert MlflowClient(tracking_uri=second.uri).get_run(second.run_id).info.run_name == "two"
    assert mlflow.active_run() is None


def test_disabled_tracking_accepts_calls_and_writes_nothing(tmp_path):
    with stage_run(TrackingConfig(enabled=False), tmp_path, "x") as t:
        t.log_metrics({"a": 1.0})
        t.log_params({"b": 2})
        assert not t.enabled and t.run_id is None
    assert not (tmp_path / "mlflow.db").exists()
