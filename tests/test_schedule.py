"""`gptflow schedule`: a trigger runs the pipeline, skips when the corpus is unchanged, runs again
when a file is added, never overlaps a run in progress (the run lock, and fire times that pass
during a run are coalesced and counted), records every trigger and its outcome in MLflow and on
disk, continues after a restart, and stops cleanly on SIGTERM. Real scheduler processes, a real
pipeline (preprocessing only, small), real MLflow; a cron of seconds, every wait bounded."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.config import TrackingConfig
from flows.tracking import events
from tests.data.preprocess_data import document

ROOT = Path(__file__).resolve().parents[1]


def _args(corpus: Path, work: Path) -> list[str]:
    return ["--workdir", str(work), "--only", "preprocess", "--set", f"data.inputs=[{corpus}]",
            "--set", "data.sft_inputs=[]", "--set", "data.vocab_size=300", "--set", "data.val_fraction=0.1",
            "--set", "data.val_min_tokens=100", "--set", "cluster.num_cpus=1"]


def _corpus(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"d{i}.txt").write_text(document(i, 300))
    return root


def _schedule(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "schedule", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def _outcomes(work: Path) -> list[str]:
    return [e["tags"]["gptflow.trigger.outcome"] for e in events(TrackingConfig(), work, "schedule")]


def _state(work: Path) -> dict:
    (path,) = (work / "schedule").glob("*/state.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_once_runs_skips_unchanged_data_refuses_overlap_and_runs_on_new_data(tmp_path):
    corpus, work = _corpus(tmp_path / "corpus"), tmp_path / "w"
    args = [*_args(corpus, work), "--once", "--on-new-data"]
    first = _schedule(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.strip().splitlines()[-1] == "ran"
    assert len(list((work / "preprocess").glob("*/DONE"))) == 1

    unchanged = _schedule(*args)
    assert unchanged.stdout.strip().splitlines()[-1] == "skipped: no new data", unchanged.stderr[-3000:]

    # another run holds the workdir's run lock: this trigger must not start a second one
    lock = work / "schedule" / "run.lock"
    with open(lock, "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        (corpus / "new.txt").write_text(document(99, 300))
        busy = _schedule(*args)
    assert busy.stdout.strip().splitlines()[-1] == "skipped: run in progress", busy.stderr[-3000:]
    assert len(list((work / "preprocess").glob("*/DONE"))) == 1

    again = _schedule(*args)  # the lock is free now and the new file is still unprocessed
    assert again.stdout.strip().splitlines()[-1] == "ran", again.stderr[-3000:]
    (latest,) = [m for m in (work / "preprocess").glob("*/manifest.json") if len(json.loads(m.read_text())["inputs"]) == 4]
    assert latest.is_file()

    bad = ["--set", "data.text_field=body", "--set", f"data.inputs=[{tmp_path / 'x.jsonl'}]"]
    failing = _schedule(*args, *bad)
    assert failing.returncode == 2 and "x.jsonl" in failing.stderr  # a missing input: the planning error, no trigger
    (tmp_path / "x.jsonl").write_text('{"text": "no body field here"}\n' * 5)
    failed = _schedule(*args, *bad)  # no record has the field: the preprocess step fails in the run
    assert failed.returncode == 1 and "failed (preprocess)" in failed.stderr, failed.stderr[-3000:]

    # every trigger and its outcome, in MLflow (the planning error above was no trigger)
    assert _outcomes(work) == ["ran", "skipped: no new data", "skipped: run in progress", "ran",
                               "failed (preprocess)"]


def _wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the scheduler exited with {proc.returncode}")
        try:
            if predicate():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", "schedule", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _sigterm(proc: subprocess.Popen) -> int:
    try:
        os.kill(proc.pid, signal.SIGTERM)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_cron_never_overlaps_coalesces_survives_a_restart_and_stops_on_sigterm(tmp_path):
    corpus, work = _corpus(tmp_path / "corpus"), tmp_path / "w"
    args = [*_args(corpus, work), "--cron", "*/2 * * * * *", "--on-new-data"]
    log = tmp_path / "scheduler.log"

    proc = _start(args, log)
    try:
        # the first trigger runs (longer than the 2 s period); later ones find no new data
        _wait_for(lambda: _state(work)["counts"].get("skipped: no new data", 0) >= 1, "a no-new-data skip", proc)
    finally:
        code = _sigterm(proc)
    assert code == 0, log.read_text()[-3000:]
    state = _state(work)
    assert state["stopped"] and state["counts"]["ran"] == 1, state
    history = [h["outcome"] for h in state["history"]]
    assert history[0] == "ran" and history[1] == "skipped: run in progress", history
    assert state["history"][1]["coalesced"] >= 1  # the fire times the run outlasted, counted in one record
    assert len(list((work / "preprocess").glob("*/DONE"))) == 1  # one run, never two at once
    before = state["counts"]["triggers"]

    time.sleep(3)  # fire times pass while no scheduler runs
    proc = _start(args, log)
    try:
        _wait_for(lambda: _state(work)["counts"]["triggers"] > before, "a trigger after the restart", proc)
    finally:
        code = _sigterm(proc)
    assert code == 0, log.read_text()[-3000:]
    after = _state(work)
    resumed = after["history"][len(state["history"])]
    assert resumed["outcome"] == "skipped: no new data"  # the fingerprint of the last success survived
    assert resumed["coalesced"] >= 1  # the fire times missed while it was down, counted
    assert after["counts"]["ran"] == 1
    assert len(_outcomes(work)) == after["counts"]["triggers"]  # every trigger is in MLflow too
