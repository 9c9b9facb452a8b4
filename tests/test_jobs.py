"""`gptflow submit` and `gptflow jobs status|logs|stop` against a real `ray start --head` with token
authentication that the test starts in its own process group and stops by pid: the pipeline runs
as a Ray job with the resolved config shipped beside it, a resubmitted id is a no-op, a job can be
stopped, and a client without the token, or a cluster without token auth, is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flows.config import load_config
from flows.ops.jobs import entrypoint, stage_working_dir, trigger_id
from tests.data.preprocess_data import document
from tests.services import BIN, ray_head

ROOT = Path(__file__).resolve().parents[1]


def _gptflow(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_the_job_ships_the_resolved_config_and_trigger_ids_are_deterministic(tmp_path):
    cfg = load_config(None, ["pretrain.steps=7", f"workdir={tmp_path}"])
    staged = stage_working_dir(cfg, tmp_path / "job")
    assert (
        load_config(staged / "gptflow-job.yaml") == cfg
    )  # the job runs exactly what was resolved here
    assert (staged / "flows" / "cli.py").is_file() and (staged / "gptcore").is_dir()
    assert not list(staged.rglob("__pycache__"))
    assert (
        entrypoint(["--only", "preprocess"])
        == "python -m flows.cli run --config gptflow-job.yaml --only preprocess"
    )
    when = "20261201T030000Z"
    assert trigger_id(cfg, when) == trigger_id(load_config(staged / "gptflow-job.yaml"), when)
    assert trigger_id(cfg, when) != trigger_id(
        load_config(None, ["pretrain.steps=8", f"workdir={tmp_path}"]), when
    )


@pytest.fixture(scope="module")
def head():
    temp = Path(
        tempfile.mkdtemp(prefix="gfj", dir="/tmp")
    )  # short: Ray's socket paths live under it
    try:
        with ray_head(temp / "ray", env={"PATH": f"{BIN}:{os.environ['PATH']}"}, num_cpus=2) as h:
            yield h
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_submit_follow_logs_status_resubmit_and_stop(head, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(document(i, 400))
    work = tmp_path / "w"
    args = [
        "--address",
        head["dashboard"],
        "--workdir",
        str(work),
        "--no-tracking",
        "--only",
        "preprocess",
        "--set",
        f"data.inputs=[{corpus}]",
        "--set",
        "data.sft_inputs=[]",
        "--set",
        "data.vocab_size=300",
        "--set",
        "data.val_fraction=0.1",
        "--set",
        "data.val_min_tokens=100",
    ]
    sub = _gptflow("submit", *args, "--submission-id", "gptflow-test-job-1")
    assert sub.returncode == 0, sub.stderr[-3000:]
    job = sub.stdout.strip().splitlines()[-1]
    assert job == "gptflow-test-job-1"

    followed = _gptflow("jobs", "logs", job, "--follow", "--address", head["dashboard"])
    assert followed.returncode == 0, followed.stderr[-3000:]
    assert followed.stdout.strip().splitlines()[-1] == f"{job}: SUCCEEDED", followed.stdout[-3000:]
    assert "preprocess  ran" in followed.stdout
    (manifest,) = (work / "preprocess").glob("*/manifest.json")  # the job wrote into our workdir
    assert (manifest.parent / "DONE").is_file()
    assert len(json.loads(manifest.read_text())["inputs"]) == 4

    status = _gptflow("jobs", "status", job, "--address", head["dashboard"])
    assert status.returncode == 0 and status.stdout.strip().startswith(f"{job}: SUCCEEDED"), (
        status.stdout
    )
    logs = _gptflow("jobs", "logs", job, "--address", head["dashboard"])
    assert "preprocess  ran" in logs.stdout

    again = _gptflow("submit", *args, "--submission-id", job)  # the same trigger: a no-op
    assert again.returncode == 0 and "exists already: not submitted again" in again.stdout, (
        again.stderr[-2000:]
    )

    # a job to stop: the default corpus and training take minutes; stopped long before
    long = _gptflow(
        "submit", "--address", head["dashboard"], "--workdir", str(tmp_path / "w2"), "--no-tracking"
    )
    assert long.returncode == 0, long.stderr[-3000:]
    long_id = long.stdout.strip().splitlines()[-1]
    assert long_id.startswith("raysubmit_")
    stopped = _gptflow("jobs", "stop", long_id, "--address", head["dashboard"])
    assert stopped.returncode == 0 and stopped.stdout.strip().endswith(f"{long_id}: STOPPED"), (
        stopped.stdout + stopped.stderr[-2000:]
    )

    unknown = _gptflow("jobs", "status", "no-such-job", "--address", head["dashboard"])
    assert unknown.returncode == 2 and "no job 'no-such-job'" in unknown.stderr, unknown.stderr[
        -2000:
    ]


@pytest.mark.slow
def test_a_client_without_the_token_is_refused(head, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {
        "HOME": str(tmp_path)
    }
    out = _gptflow("jobs", "status", "x", "--address", head["dashboard"], env=env)
    assert out.returncode == 2 and "requires its token" in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
def test_a_cluster_without_token_auth_is_refused_unless_allowed(tmp_path):
    temp = Path(tempfile.mkdtemp(prefix="gfn", dir="/tmp"))
    try:
        with ray_head(temp / "ray", env={"RAY_AUTH_MODE": "disabled"}) as open_head:
            env = os.environ | {"RAY_AUTH_MODE": "disabled"}
            out = _gptflow("jobs", "status", "x", "--address", open_head["dashboard"], env=env)
            assert out.returncode == 2 and "accepts requests without a token" in out.stderr, (
                out.stderr[-2000:]
            )
            allowed = _gptflow(
                "jobs",
                "status",
                "x",
                "--address",
                open_head["dashboard"],
                "--allow-no-auth",
                env=env,
            )
            assert allowed.returncode == 2 and "no job 'x'" in allowed.stderr, allowed.stderr[
                -2000:
            ]
    finally:
        shutil.rmtree(temp, ignore_errors=True)
