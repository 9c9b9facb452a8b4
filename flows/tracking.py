"""MLflow behind one seam: the only module in gptflow that imports mlflow.

A stage opens ``with stage_run(cfg.tracking, workdir, "preprocess", params) as tracker:`` and logs
through the :class:`Tracker` it gets. Every call goes through ``MlflowClient`` with an explicit
run id, so Ray workers can log into the driver's run with :func:`attach`. A run opened while
another is active (the pipeline's parent run) is nested under it. With tracking disabled the
tracker accepts every call and does nothing, so a stage can be tested alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.config import TrackingConfig, flatten

log = logging.getLogger(__name__)

_MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value


def tracking_uri(cfg: TrackingConfig, workdir: str | Path) -> str:
    """MLFLOW_TRACKING_URI, else the config's uri, else a sqlite file in the workdir."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    if uri:
        return uri
    if "://" in str(workdir):
        raise ValueError(
            f"workdir {workdir} is remote: set MLFLOW_TRACKING_URI (or tracking.uri) to a tracking server"
        )
    db = Path(workdir).resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"  # absolute path: sqlite:////abs/path


def _use_store(uri: str) -> None:
    """Point MLflow's process-wide client at `uri` without changing MLFLOW_TRACKING_URI.

    mlflow.set_tracking_uri also exports the environment variable in MLflow 3; left there it
    would make every later tracking_uri() return this store, even for another workdir.
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def _artifact_location(workdir: str | Path) -> str:
    if "://" in str(workdir):
        return f"{str(workdir).rstrip('/')}/mlartifacts"
    return (Path(workdir).resolve() / "mlartifacts").as_uri()


class Tracker:
    """Logging handle on one MLflow run (or a no-op when run_id is None)."""

    def __init__(self, run_id: str | None = None, uri: str | None = None):
        self.run_id = run_id
        self.uri = uri
        self._client = None
        if run_id is not None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=uri)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self._client:
            return
        from mlflow.entities import Param

        flat = flatten(dict(params))
        items = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self._client:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self._client:
            return
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._client:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if self._client:
            self._client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        if self._client:
            self._client.log_dict(self.run_id, dict(data), name)

    def log_text(self, text: str, name: str) -> None:
        if self._client:
            self._client.log_text(self.run_id, text, name)

    def log_figure(self, figure: Any, name: str) -> None:
        """Log a matplotlib figure as a PNG artifact."""
        if self._client:
            self._client.log_figure(self.run_id, figure, name)

    def log_input_dataset(self, name: str, source: str, digest: str, context: str = "training",
                          profile: Mapping[str, Any] | None = None) -> None:
        """Record an input dataset (name, where it came from, its content digest) on the run."""
        if not self._client:
            return
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(
            name=name, digest=digest[:36], source_type="local" if "://" not in source else "uri",
            source=json.dumps({"uri": source}), profile=json.dumps(dict(profile or {})),
        )
        self._client.log_inputs(
            self.run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])]
        )


@contextmanager
def stage_run(
    cfg: TrackingConfig, workdir: str | Path, name: str, params: Mapping[str, Any] | None = None
) -> Iterator[Tracker]:
    """Open an MLflow run for one stage (nested under an active run), yield its Tracker.

    The run ends FINISHED, or FAILED when the body raises; the exception propagates.
    """
    if not cfg.enabled:
        yield Tracker()
        return
    import mlflow

    uri = tracking_uri(cfg, workdir)
    _use_store(uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        # Explicit artifact location: otherwise artifacts land in ./mlruns of the cwd.
        experiment_id = mlflow.create_experiment(cfg.experiment, artifact_location=_artifact_location(workdir))
    else:
        experiment_id = experiment.experiment_id
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=name, experiment_id=experiment_id, nested=nested) as run:
        tracker = Tracker(run.info.run_id, uri)
        tracker.set_tags({"gptflow.stage": name})
        if params:
            tracker.log_params(params)
        yield tracker


def attach(run_id: str | None, uri: str | None) -> Tracker:
    """A Tracker on an existing run, e.g. from a Ray Train worker given the driver's run id."""
    return Tracker(run_id, uri) if run_id else Tracker()


def download_model(uri: str, dst: str | Path, cfg: TrackingConfig | None = None,
                   workdir: str | Path = "work") -> Path:
    """Download a registered model's artifacts (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) to `dst`.

    The registry logs bundles as MLflow models whose artifact directory is a bundle directory, so
    the result holds the bundle files (possibly under a subfolder; the caller looks for them).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    store = tracking_uri(cfg or TrackingConfig(), workdir)
    # Process-wide, as stage_run does: MLflow 3 resolves models:/ names through the global registry
    # URI even when download_artifacts is given one.
    _use_store(store)
    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(dst), tracking_uri=store, registry_uri=store))
    except MlflowException as e:
        raise ValueError(f"cannot download model {uri} from {store}: {e.message}") from e
