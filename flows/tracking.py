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
            f"workdir {workdir} is remote: "
            "set MLFLOW_TRACKING_URI (or tracking.uri) to a tracking server"
        )
    db = Path(workdir).resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"  # absolute path: sqlite:////abs/path


def without_credentials(uri: str) -> str:
    """`uri` without user:password: what may travel (a Ray job's environment, a config file) while
    the credentials stay where they are (MLFLOW_TRACKING_USERNAME/PASSWORD on the nodes that use
    it)."""
    import urllib.parse

    if "://" not in uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def shareable_config(cfg: Any) -> dict[str, Any]:
    """The resolved config as a dict for files that leave this process (a Ray job's config, the
    scheduler's run config): tracking.uri without its credentials."""
    from flows.config import to_dict

    out = to_dict(cfg)
    uri = out.get("tracking", {}).get("uri")
    if uri:
        out["tracking"]["uri"] = without_credentials(uri)
    return out


PROBE_TIMEOUT_S = 15.0
_PROBED: dict[
    str, float
] = {}  # uri -> when it last answered (a probe per process per half minute at most)


def _redacted(text: str) -> str:
    from flows.redact import redact_text

    return redact_text(text)


def check_reachable(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast when an HTTP tracking server does not answer: one bounded request to its /health
    (any HTTP answer counts, 401 included), instead of MLflow's minutes of retries ending in chained
    tracebacks that print the URI with its password. ConfigError names the redacted URI and what to
    do. Local stores (sqlite, files) have nothing to probe."""
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    from flows.config import ConfigError

    if not uri.startswith(("http://", "https://")) or time.time() - _PROBED.get(uri, -1e9) < 30:
        return
    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    url = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))
    headers = {}
    if (
        parts.username is not None
    ):  # MLflow's basic auth: the same credentials, never in the URL sent
        pair = (
            f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        )
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout_s
        ):
            pass
    except urllib.error.HTTPError:
        pass  # it answered
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(
            f"the MLflow tracking server {_redacted(uri)} does not answer "
            f"({_redacted(str(reason))}; waited at most {timeout_s:.0f} s): start it or fix "
            "MLFLOW_TRACKING_URI / tracking.uri, or run with --no-tracking (tracking.enabled=false)"
        ) from None
    _PROBED[uri] = time.time()


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

        from flows.redact import redact_text

        flat = flatten(dict(params))
        # Input URLs may carry credentials (user:password, tokens, presigned signatures): never
        # logged.
        items = [Param(k, redact_text(str(v))[:_MAX_PARAM_CHARS]) for k, v in sorted(flat.items())]
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

        from flows.redact import redact_text

        self._client.log_batch(
            self.run_id, tags=[RunTag(k, redact_text(str(v))) for k, v in tags.items()]
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._client:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if self._client:
            self._client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        if self._client:
            from flows.redact import redact

            self._client.log_dict(self.run_id, redact(dict(data)), name)

    def log_text(self, text: str, name: str) -> None:
        if self._client:
            self._client.log_text(self.run_id, _redacted(text), name)

    def log_figure(self, figure: Any, name: str) -> None:
        """Log a matplotlib figure as a PNG artifact."""
        if self._client:
            self._client.log_figure(self.run_id, figure, name)

    def log_input_dataset(
        self,
        name: str,
        source: str,
        digest: str,
        context: str = "training",
        profile: Mapping[str, Any] | None = None,
    ) -> None:
        """Record an input dataset (name, where it came from, its content digest) on the run."""
        if not self._client:
            return
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        from flows.redact import redact_text

        name, source = redact_text(name), redact_text(source)
        ds = Dataset(
            name=name,
            digest=digest[:36],
            source_type="local" if "://" not in source else "uri",
            source=json.dumps({"uri": source}),
            profile=json.dumps(dict(profile or {})),
        )
        self._client.log_inputs(
            self.run_id,
            datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])],
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
    check_reachable(uri)
    _use_store(uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        # Explicit artifact location: otherwise artifacts land in ./mlruns of the cwd.
        experiment_id = mlflow.create_experiment(
            cfg.experiment, artifact_location=_artifact_location(workdir)
        )
    else:
        experiment_id = experiment.experiment_id
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=name, experiment_id=experiment_id, nested=nested) as run:
        tracker = Tracker(run.info.run_id, uri)
        tracker.set_tags({"gptflow.stage": name})
        if params:
            tracker.log_params(params)
        yield tracker


def record_event(
    cfg: TrackingConfig,
    workdir: str | Path,
    name: str,
    tags: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
) -> str | None:
    """One finished MLflow run that records an event (a scheduler trigger and its outcome); its id.

    Through MlflowClient alone (no process-wide active run): safe beside a stage_run in progress.
    """
    if not cfg.enabled:
        return None
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg, workdir)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(cfg.experiment, artifact_location=_artifact_location(workdir))
    )
    run = client.create_run(experiment_id, run_name=name, tags={"gptflow.stage": name})
    tracker = Tracker(run.info.run_id, uri)
    tracker.set_tags(tags)
    if metrics:
        tracker.log_metrics(metrics)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def events(cfg: TrackingConfig, workdir: str | Path, name: str) -> list[dict[str, Any]]:
    """The runs `record_event` wrote under `name`, oldest first: their tags and metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(cfg, workdir))
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`gptflow.stage` = '{name}'",
        order_by=["attributes.start_time ASC"],
        max_results=10_000,
    )
    return [
        {"run_id": r.info.run_id, "tags": dict(r.data.tags), "metrics": dict(r.data.metrics)}
        for r in runs
    ]


def attach(run_id: str | None, uri: str | None) -> Tracker:
    """A Tracker on an existing run, e.g. from a Ray Train worker given the driver's run id."""
    return Tracker(run_id, uri) if run_id else Tracker()


def download_model(
    uri: str, dst: str | Path, cfg: TrackingConfig | None = None, workdir: str | Path = "work"
) -> Path:
    """Download a registered model's artifacts (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``)
    to `dst`.

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
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(dst), tracking_uri=store, registry_uri=store
            )
        )
    except MlflowException as e:
        raise ValueError(
            _redacted(f"cannot download model {uri} from {store}: {e.message}")
        ) from None


# --------------------------------------------------------------------------- the model registry


class RegistryError(ValueError):
    """A registry request that cannot be served: an unknown name, alias or version, missing or
    corrupt artifacts, an unreachable store. The message names what was asked for."""


class Registry:
    """The MLflow model registry behind the seam: log a bundle as a pyfunc model, register versions,
    move aliases, read and write tags. The registry *policy* (the promotion gate, rollback, lineage)
    lives in flows/registry/ and only calls these methods."""

    def __init__(self, cfg: TrackingConfig, workdir: str | Path):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(cfg, workdir)
        check_reachable(self.uri)
        _use_store(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as e:
            raise RegistryError(_redacted(f"{what}: {e.message} (registry {self.uri})")) from None
        except (OSError, ConnectionError) as e:
            raise RegistryError(
                _redacted(f"{what}: the registry at {self.uri} is unreachable ({e})")
            ) from None

    def log_bundle_model(
        self,
        bundle: str | Path,
        code: str | Path,
        code_paths: list[str],
        pip_requirements: list[str],
        params: Mapping[str, Any],
        example: list[str],
    ) -> str:
        """Log `bundle` as a pyfunc model of the active run (the model is the code file `code`; the
        bundle files are its ``bundle`` artifact); return the model URI."""
        import mlflow
        import pandas as pd
        from mlflow.models.signature import ModelSignature
        from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

        def dtype(v: Any) -> str:
            return {bool: "boolean", int: "long", float: "double"}.get(type(v), "string")

        signature = ModelSignature(
            # unnamed: a list of strings and a one-column DataFrame (e.g. "prompt") both fit
            inputs=Schema([ColSpec("string")]),
            outputs=Schema([ColSpec("string")]),
            params=ParamSchema([ParamSpec(k, dtype(v), v) for k, v in params.items()]),
        )
        info = self._call(
            f"logging {bundle} as a model",
            mlflow.pyfunc.log_model,
            name="model",
            python_model=str(code),
            artifacts={"bundle": str(bundle)},
            code_paths=code_paths,
            signature=signature,
            input_example=(pd.DataFrame({"prompt": example}), {"max_tokens": 4}),
            pip_requirements=pip_requirements,
        )
        return info.model_uri

    def register(self, model_uri: str, name: str, tags: Mapping[str, Any]) -> str:
        """A new version of `name` (created if missing) for `model_uri`; returns its number."""
        import mlflow

        mv = self._call(
            f"registering {model_uri} as {name!r}",
            mlflow.register_model,
            model_uri,
            name,
            tags={k: str(v) for k, v in tags.items()},
        )
        return str(mv.version)

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of `name`, oldest first, with tags and aliases; RegistryError if
        unknown."""
        model = self._call(f"model {name!r}", self.client.get_registered_model, name)
        found = self._call(
            f"versions of {name!r}", self.client.search_model_versions, f"name='{name}'"
        )
        versions = sorted((_version_dict(v) for v in found), key=lambda v: int(v["version"]))
        aliases = dict(model.aliases or {})  # search results carry no aliases; the model does
        for v in versions:
            v["aliases"] = sorted(a for a, n in aliases.items() if str(n) == v["version"])
        return versions

    def version(self, name: str, version: str | int) -> dict[str, Any]:
        return _version_dict(
            self._call(
                f"model {name!r} version {version}",
                self.client.get_model_version,
                name,
                str(version),
            )
        )

    def by_alias(self, name: str, alias: str) -> dict[str, Any] | None:
        """The version `alias` points at, or None when the alias is not set (the model must
        exist)."""
        from mlflow.exceptions import MlflowException

        model = self._call(f"model {name!r}", self.client.get_registered_model, name)
        if alias not in (model.aliases or {}):
            return None
        try:
            return _version_dict(self.client.get_model_version_by_alias(name, alias))
        except MlflowException as e:
            raise RegistryError(_redacted(f"model {name!r} alias {alias!r}: {e.message}")) from None

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        self._call(
            f"setting {name}@{alias}",
            self.client.set_registered_model_alias,
            name,
            alias,
            str(version),
        )

    def set_version_tags(self, name: str, version: str | int, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._call(
                f"tagging {name}/{version}",
                self.client.set_model_version_tag,
                name,
                str(version),
                k,
                str(v),
            )

    def model_tags(self, name: str) -> dict[str, str]:
        return dict(
            self._call(f"model {name!r}", self.client.get_registered_model, name).tags or {}
        )

    def set_model_tags(self, name: str, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._call(f"tagging {name}", self.client.set_registered_model_tag, name, k, str(v))

    def create_model(self, name: str, tags: Mapping[str, Any], description: str) -> bool:
        """Create registered model `name`; False when it exists already. Creation is atomic in the
        store (the name is unique), so it is a mutex every process using this registry sees."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                name, tags={k: str(v) for k, v in tags.items()}, description=description
            )
            return True
        except MlflowException as e:
            if e.error_code == "RESOURCE_ALREADY_EXISTS":
                return False
            raise RegistryError(
                _redacted(f"creating {name!r}: {e.message} (registry {self.uri})")
            ) from None

    def delete_model(self, name: str) -> None:
        self._call(f"deleting {name!r}", self.client.delete_registered_model, name)

    def download(self, name: str, version: str | int, dst: str | Path) -> Path:
        """The version's model directory, downloaded under `dst`."""
        import mlflow

        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(
            self._call(
                f"downloading {name}/{version}",
                mlflow.artifacts.download_artifacts,
                artifact_uri=f"models:/{name}/{version}",
                dst_path=str(dst),
                tracking_uri=self.uri,
                registry_uri=self.uri,
            )
        )

    def run(self, run_id: str) -> dict[str, Any] | None:
        """A run's name, status, times and tags, or None when it does not exist (any more)."""
        from mlflow.exceptions import MlflowException

        try:
            r = self.client.get_run(run_id)
        except MlflowException:
            return None
        return {
            "run_id": run_id,
            "name": r.info.run_name,
            "status": r.info.status,
            "start_time": r.info.start_time,
            "end_time": r.info.end_time,
            "tags": dict(r.data.tags),
        }


def _version_dict(v: Any) -> dict[str, Any]:
    return {
        "name": v.name,
        "version": str(v.version),
        "tags": dict(v.tags or {}),
        "aliases": list(v.aliases or []),
        "run_id": v.run_id,
        "source": v.source,
        "created": v.creation_timestamp,
        "status": v.status,
    }
