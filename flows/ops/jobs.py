"""The pipeline as a Ray job: ``gptflow submit`` and ``gptflow jobs status|logs|stop``.

What it is: a thin layer over Ray's Jobs API (``JobSubmissionClient``; no job runner of our own).
A submission ships a working directory staged from the installed sources (flows/, gptcore/,
configs/, pyproject.toml) plus the *resolved* config as one YAML file, so the job runs exactly the
config the submitter saw, whatever the cluster's copy of the project says. The job's driver is
``python -m flows.cli run --config gptflow-job.yaml`` on the head; it joins the cluster through
RAY_ADDRESS, which the job supervisor sets. ``MLFLOW_TRACKING_URI`` of the submitting shell goes
with the job, without the user:password it may carry; credentials do not travel (nodes have their
own: instance roles, MLFLOW_TRACKING_USERNAME/PASSWORD in their environment).

Token authentication stays on: the client sends the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
Ray's token file ``~/.ray/auth_token``), and before submitting checks that the Jobs API refuses a
request *without* it; a cluster that does not is refused unless ``cluster.allow_no_auth``.

Submission ids: given ones are passed to Ray, which rejects a second job under the same id; a
resubmission of an id that exists is a no-op that returns the existing job (what makes scheduled
triggers idempotent: :func:`trigger_id`).

What it is not: the scheduler (flows/ops/schedule.py), or anything that runs on the cluster.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from flows.config import ConfigError, PipelineConfig, stable_hash, to_dict

log = logging.getLogger(__name__)

JOB_CONFIG = "gptflow-job.yaml"
# What a job needs of the project; the rest of a checkout (a venv, outputs, .git) stays home.
_SOURCES = ("flows", "gptcore", "configs", "pyproject.toml")
# Environment a job takes from the submitting shell: where its runs go, nothing secret.
_FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 90


def dashboard_address(address: str | None) -> str:
    """The Jobs API address: --address, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS."""
    for value, source in (
        (address, "--address"),
        (os.environ.get("RAY_API_SERVER_ADDRESS"), "RAY_API_SERVER_ADDRESS"),
        (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS"),
    ):
        if value:
            if not value.startswith(("http://", "https://")):
                if source == "RAY_ADDRESS":
                    continue
                raise ConfigError(
                    f"{source}={value!r}: the Jobs API is the dashboard's http address, "
                    "e.g. http://HEAD:8265 (`ray dashboard cluster.yaml` forwards it to 127.0.0.1)"
                )
            return value.rstrip("/")
    raise ConfigError(
        "no Ray cluster to submit to: give --address http://HEAD:8265 "
        "(or set RAY_API_SERVER_ADDRESS)"
    )


def read_token() -> str | None:
    """Ray's auth token, in Ray's own order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(path)] if path else [Path.home() / ".ray" / "auth_token"]
    for p in candidates:
        try:
            token = p.read_text(encoding="utf-8").strip()
        except OSError:
            if path:
                raise ConfigError(
                    f"RAY_AUTH_TOKEN_PATH={path}: cannot read the Ray token there"
                ) from None
            continue
        if token:
            return token
    return None


def _enforces_auth(address: str) -> bool:
    """Whether the Jobs API refuses a request that carries no token (what a stranger would send)."""
    try:
        with urllib.request.urlopen(f"{address}/api/jobs/", timeout=10):
            return False
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return True
        raise ConfigError(
            f"Ray Jobs API at {address}: HTTP {e.code} to a plain request; is it a Ray dashboard?"
        ) from e
    except (urllib.error.URLError, OSError) as e:
        raise ConfigError(
            f"Ray Jobs API at {address} does not answer ({getattr(e, 'reason', e)}); is the "
            "cluster up and the dashboard forwarded (`ray dashboard cluster.yaml`)?"
        ) from e


def client(address: str | None, allow_no_auth: bool = False) -> Any:
    """A JobSubmissionClient on a cluster that is seen to enforce token authentication."""
    from flows.cluster import check_token_auth

    url = dashboard_address(address)
    enforced = _enforces_auth(url)
    check_token_auth(enforced, url, allow_no_auth)
    token = read_token()
    if enforced and not token:
        raise ConfigError(
            f"Ray at {url} requires its token: set RAY_AUTH_TOKEN, or put it in ~/.ray/auth_token "
            "(`ray get-auth-token` on the head prints it)"
        )
    # Before `import ray`: the SDK sends the token only in token mode (we also send it ourselves).
    os.environ.setdefault("RAY_AUTH_MODE", "token" if enforced else "disabled")
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except (ConnectionError, RuntimeError) as e:
        raise ConfigError(f"Ray Jobs API at {url}: {e}") from e


# --------------------------------------------------------------------------- submit


def source_root() -> Path:
    """The directory holding the flows and gptcore packages this process runs."""
    import flows

    return Path(flows.__file__).resolve().parents[1]


def stage_working_dir(cfg: PipelineConfig, into: Path) -> Path:
    """Copy what a job needs into `into`, with the resolved config as gptflow-job.yaml; return
    it."""
    root = source_root()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in _SOURCES:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, into / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, into / name)
    from flows.tracking import shareable_config

    (into / JOB_CONFIG).write_text(
        yaml.safe_dump(shareable_config(cfg), sort_keys=False), encoding="utf-8"
    )
    return into


def check_submittable(cfg: PipelineConfig) -> None:
    """A job runs in a temporary directory on the head: a relative workdir would vanish with it."""
    if "://" not in cfg.workdir and not Path(cfg.workdir).is_absolute():
        raise ConfigError(
            f"workdir={cfg.workdir!r} is relative: a job runs in a temporary directory on the "
            "cluster; give an absolute path on its shared filesystem "
            "(e.g. --workdir /mnt/gptflow/work)"
        )


def entrypoint(run_args: list[str], verbose: bool = False) -> str:
    import shlex

    return " ".join(
        [
            "python",
            "-m",
            "flows.cli",
            *(["-v"] if verbose else []),
            "run",
            "--config",
            JOB_CONFIG,
            *map(shlex.quote, run_args),
        ]
    )


def run_identity(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as far as it decides what a run does: the schedule section (how a scheduler waits)
    apart, so that changing it neither renames triggers nor loses a scheduler's state."""
    return {k: v for k, v in to_dict(cfg).items() if k != "schedule"}


def trigger_id(cfg: PipelineConfig, when: str) -> str:
    """The submission id of a scheduled trigger: the same config and trigger time give the same
    id."""
    return f"gptflow-{stable_hash(run_identity(cfg), length=12)}-{when}"


def submit(
    cfg: PipelineConfig,
    address: str | None,
    run_args: list[str] | None = None,
    submission_id: str | None = None,
    verbose: bool = False,
) -> tuple[str, bool]:
    """Submit the pipeline; returns (submission id, whether it was newly submitted).

    A `submission_id` that already names a job is not submitted again (Ray would reject it).
    `verbose`: the job runs `gptflow -v run` (debug logs, tracebacks).
    """
    check_submittable(cfg)
    jobs = client(address, cfg.cluster.allow_no_auth)
    if submission_id and _exists(jobs, submission_id):
        log.info("job %s exists already: not submitted again", submission_id)
        return submission_id, False
    env = job_env()
    with tempfile.TemporaryDirectory(prefix="gptflow-job-") as tmp:
        working_dir = stage_working_dir(cfg, Path(tmp))
        deadline = time.time() + AGENT_WAIT_S
        while True:
            try:
                job_id = jobs.submit_job(
                    entrypoint=entrypoint(list(run_args or []), verbose),
                    submission_id=submission_id,
                    runtime_env={"working_dir": str(working_dir), "env_vars": env},
                    metadata={"gptflow.config_hash": stable_hash(to_dict(cfg), length=16)},
                )
                return job_id, True
            except RuntimeError as e:
                if submission_id and "already exists" in str(
                    e
                ):  # a concurrent resubmission won the race
                    return submission_id, False
                # A head that just started answers before its job agent is up: wait for it, bounded.
                if "No available agent" not in str(e) or time.time() > deadline:
                    raise
                log.info("the cluster's job agent is not up yet; retrying")
                time.sleep(2)


def job_env() -> dict[str, str]:
    """The environment a job gets from this shell: the tracking URI without its credentials (a job's
    environment is visible in the dashboard to anyone with cluster access); the nodes provide them
    (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in their own environment)."""
    from flows.tracking import without_credentials

    env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    uri = env.get("MLFLOW_TRACKING_URI")
    if uri and without_credentials(uri) != uri:
        env["MLFLOW_TRACKING_URI"] = without_credentials(uri)
        log.warning(
            "MLFLOW_TRACKING_URI carries credentials: the job gets it without them (%s); set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD on the cluster's nodes",
            env["MLFLOW_TRACKING_URI"],
        )
    return env


def _exists(jobs: Any, submission_id: str) -> bool:
    try:
        jobs.get_job_info(submission_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e).lower() or "not found" in str(e).lower():
            return False
        raise
    return True


# --------------------------------------------------------------------------- jobs


def status(jobs: Any, job_id: str) -> dict[str, Any]:
    info = _call(jobs.get_job_info, job_id)
    return {
        "submission_id": info.submission_id or job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message or "",
        "entrypoint": info.entrypoint,
    }


def logs(jobs: Any, job_id: str) -> str:
    return _call(jobs.get_job_logs, job_id)


def follow(jobs: Any, job_id: str) -> Iterator[str]:
    """The job's log as it grows, until the job ends (Ray's tail_job_logs websocket)."""
    import asyncio

    _call(jobs.get_job_info, job_id)  # an unknown id: an error, not an empty stream
    loop = asyncio.new_event_loop()
    try:
        tail = jobs.tail_job_logs(job_id).__aiter__()
        while True:
            try:
                yield loop.run_until_complete(tail.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def stop(jobs: Any, job_id: str, wait_s: float = 60) -> str:
    """Stop the job and wait (bounded) until Ray reports it ended; returns its final status."""
    _call(jobs.stop_job, job_id)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        state = status(jobs, job_id)["status"]
        if state in TERMINAL:
            return state
        time.sleep(0.5)
    return status(jobs, job_id)["status"]


class NoSuchJob(ConfigError):
    """The cluster knows no job of that id (a wrong id, or a cluster started afresh since)."""


def _call(fn: Any, job_id: str) -> Any:
    try:
        return fn(job_id)
    except RuntimeError as e:
        text = str(e)
        if "404" in text or "does not exist" in text.lower() or "not found" in text.lower():
            raise NoSuchJob(
                f"no job {job_id!r} on this cluster (`ray job list` shows the ids)"
            ) from None
        raise
