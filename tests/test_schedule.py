"""`gptflow schedule`: a trigger runs the pipeline, skips when the corpus is unchanged, runs again
when a file is added, never overlaps a run in progress (the run lock, and fire times that pass
during a run are coalesced and counted), records every trigger and its outcome in MLflow and on
disk, continues after a restart, and stops cleanly on SIGTERM. Real scheduler processes, a real
pipeline (preprocessing only, small), real MLflow; a cron of seconds, every wait bounded.

Then the scheduler's own loop in this process, with Ray's Jobs API scripted (FakeJobs: the point is
what the scheduler does with what the API says, not Ray): a trigger that raises is recorded and the
loop goes on, inputs still being written defer the trigger, a job in flight is re-attached after a
restart before anything new is submitted, and a job past its time is stopped."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from flows.config import DataConfig, PipelineConfig, ScheduleConfig, TrackingConfig
from flows.ops import jobs, schedule
from flows.ops.schedule import IN_PROGRESS, Scheduler
from flows.tracking import events
from tests.data.preprocess_data import document

ROOT = Path(__file__).resolve().parents[1]


def _args(corpus: Path, work: Path) -> list[str]:
    return [
        "--workdir",
        str(work),
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
        "--set",
        "cluster.num_cpus=1",
        "--set",
        "schedule.settle_s=0",
    ]  # the corpus is written just before: settled on purpose


def _corpus(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"d{i}.txt").write_text(document(i, 300))
    return root


def _schedule(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "schedule", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _outcomes(work: Path) -> list[str]:
    return [
        e["tags"]["gptflow.trigger.outcome"] for e in events(TrackingConfig(), work, "schedule")
    ]


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
    assert unchanged.stdout.strip().splitlines()[-1] == "skipped: no new data", unchanged.stderr[
        -3000:
    ]

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
    (latest,) = [
        m
        for m in (work / "preprocess").glob("*/manifest.json")
        if len(json.loads(m.read_text())["inputs"]) == 4
    ]
    assert latest.is_file()

    bad = ["--set", "data.text_field=body", "--set", f"data.inputs=[{tmp_path / 'x.jsonl'}]"]
    failing = _schedule(*args, *bad)
    assert (
        failing.returncode == 2 and "x.jsonl" in failing.stderr
    )  # a missing input: the error, in one line
    (tmp_path / "x.jsonl").write_text('{"text": "no body field here"}\n' * 5)
    failed = _schedule(*args, *bad)  # no record has the field: the preprocess step fails in the run
    assert failed.returncode == 1 and "failed (preprocess)" in failed.stderr, failed.stderr[-3000:]

    # every trigger and its outcome, in MLflow (the missing input too: a trigger that failed)
    assert _outcomes(work) == [
        "ran",
        "skipped: no new data",
        "skipped: run in progress",
        "ran",
        "failed (inputs error)",
        "failed (preprocess)",
    ]


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
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "schedule", *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


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
        _wait_for(
            lambda: _state(work)["counts"].get("skipped: no new data", 0) >= 1,
            "a no-new-data skip",
            proc,
        )
    finally:
        code = _sigterm(proc)
    assert code == 0, log.read_text()[-3000:]
    state = _state(work)
    assert state["stopped"] and state["counts"]["ran"] == 1, state
    history = [h["outcome"] for h in state["history"]]
    assert history[0] == "ran" and history[1] == "skipped: run in progress", history
    assert (
        state["history"][1]["coalesced"] >= 1
    )  # the fire times the run outlasted, counted in one record
    assert len(list((work / "preprocess").glob("*/DONE"))) == 1  # one run, never two at once
    before = state["counts"]["triggers"]

    time.sleep(3)  # fire times pass while no scheduler runs
    proc = _start(args, log)
    try:
        _wait_for(
            lambda: _state(work)["counts"]["triggers"] > before, "a trigger after the restart", proc
        )
    finally:
        code = _sigterm(proc)
    assert code == 0, log.read_text()[-3000:]
    after = _state(work)
    resumed = after["history"][len(state["history"])]
    assert (
        resumed["outcome"] == "skipped: no new data"
    )  # the fingerprint of the last success survived
    assert resumed["coalesced"] >= 1  # the fire times missed while it was down, counted
    assert after["counts"]["ran"] == 1
    assert len(_outcomes(work)) == after["counts"]["triggers"]  # every trigger is in MLflow too


# ---------------------------------------------------------------------- the loop, Jobs API scripted

ADDRESS = "http://127.0.0.1:8265"


class Killed(BaseException):
    """What the scheduler process being killed looks like from inside a call: nothing catches it."""


class FakeJobs:
    """Ray's Jobs API as the scheduler reaches it through flows/ops/jobs.py, scripted. Each
    submitted job answers the statuses of its script in turn (the last repeats); an entry that is an
    exception is raised instead. `submit_errors` are raised by the next submissions; `after_submit`
    runs after each accepted one."""

    def __init__(self, monkeypatch, *scripts):
        self.scripts = [list(sc) for sc in scripts]
        self.jobs: dict[str, list] = {}
        self.last: dict[str, str] = {}
        self.polls: Counter = Counter()
        self.submitted: list[str] = []
        self.stopped: list[str] = []
        self.overlapping: list[str] = []  # jobs still running when another was submitted
        self.submit_errors: list[BaseException] = []
        self.after_submit = None
        for name in ("submit", "client", "status", "logs", "stop"):
            monkeypatch.setattr(jobs, name, getattr(self, name))
        monkeypatch.setattr(schedule, "POLL_S", 0.01)

    def submit(self, cfg, address, run_args=None, submission_id=None, verbose=False):
        if self.submit_errors:
            raise self.submit_errors.pop(0)
        self.overlapping += [j for j, state in self.last.items() if state not in jobs.TERMINAL]
        self.jobs[submission_id] = self.scripts.pop(0)
        self.last[submission_id] = "PENDING"
        self.submitted.append(submission_id)
        if self.after_submit:
            self.after_submit()
        return submission_id, True

    def client(self, address, allow_no_auth=False):
        return "client"

    def status(self, client, job_id):
        self.polls[job_id] += 1
        script = self.jobs[job_id]
        answer = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(answer, BaseException):
            raise answer
        self.last[job_id] = answer
        return {"submission_id": job_id, "status": answer}

    def logs(self, client, job_id):
        return "gptflow run: step 'pretrain' failed: ..."

    def stop(self, client, job_id, wait_s=60):
        self.stopped.append(job_id)
        self.jobs[job_id] = ["STOPPED"]
        return "STOPPED"


def _config(corpus: Path, work: Path, **schedule_keys) -> PipelineConfig:
    return PipelineConfig(
        workdir=str(work),
        data=DataConfig(inputs=(str(corpus),), sft_inputs=()),
        tracking=TrackingConfig(enabled=False),
        schedule=ScheduleConfig(**schedule_keys),
    )


def _history(s: Scheduler) -> list[str]:
    """The outcomes on disk, without the coalesced fire times a slow machine may add between
    them."""
    return [
        h["outcome"]
        for h in json.loads(s.state_path.read_text())["history"]
        if h["outcome"] != IN_PROGRESS
    ]


def test_a_trigger_that_raises_is_recorded_failed_and_the_schedule_goes_on(tmp_path, monkeypatch):
    """Fingerprinting that raises (a stale NFS handle), a submission that raises (the Jobs API
    answering 503) and a dashboard blip while the job runs: none ends the loop. Each failure is in
    the state file with its error, the credentials in it replaced by ***."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-token-planted-7f3a")
    work = tmp_path / "w"
    s = Scheduler(
        _config(_corpus(tmp_path / "corpus"), work, settle_s=0),
        cron="* * * * * *",
        on_new_data=True,
        address=ADDRESS,
    )
    cluster = FakeJobs(
        monkeypatch, [ConnectionError("dashboard restarting"), "RUNNING", "SUCCEEDED"]
    )
    cluster.submit_errors = [
        RuntimeError(
            "Jobs API http://admin:hunter2-planted@head:8265/api/jobs/: 503 "
            "(sent Bearer ray-token-planted-7f3a)"
        )
    ]
    cluster.after_submit = s.stopping.set  # the third trigger submits: the last one
    fingerprints = iter([OSError(116, "Stale file handle"), "fp-1", "fp-1"])

    def fingerprint() -> str:
        fp = next(fingerprints)
        if isinstance(fp, Exception):
            raise fp
        return fp

    monkeypatch.setattr(s, "fingerprint", fingerprint)
    assert s.loop(install_signals=False) == 0
    assert _history(s) == ["failed (inputs error)", "failed (submit error)", "ran"]
    failed = [h for h in s.state["history"] if h["outcome"].startswith("failed")]
    assert failed[0]["error"] == "OSError: [Errno 116] Stale file handle"
    assert failed[1]["error"].startswith(
        "RuntimeError: Jobs API http://***@head:8265/api/jobs/: 503"
    ), failed[1]
    text = s.state_path.read_text()
    assert "hunter2-planted" not in text and "ray-token-planted" not in text
    assert s.state["last_success_fingerprint"] == "fp-1" and "in_flight" not in s.state
    assert cluster.polls[cluster.submitted[0]] == 3  # asked again after the blip, until it ended


def test_inputs_still_being_written_defer_the_trigger_until_they_are_settled(tmp_path, monkeypatch):
    """A file whose size or mtime changed within schedule.settle_s is neither fingerprinted nor
    trained on: the trigger is deferred, naming it, and the next one looks again. Time passing is
    written into the files' mtimes and the first look's time, never waited for."""
    import flows.data.stage

    corpus = _corpus(tmp_path / "corpus")
    hour_ago = time.time() - 3600
    for f in corpus.iterdir():
        os.utime(f, (hour_ago, hour_ago))
    growing = corpus / "growing.txt"
    growing.write_text(document(50, 300)[:500])  # being copied in: mtime now
    s = Scheduler(_config(corpus, tmp_path / "w", settle_s=600), on_new_data=True, address=ADDRESS)
    cluster = FakeJobs(monkeypatch, ["SUCCEEDED"], ["SUCCEEDED"])
    real = flows.data.stage.fingerprint
    fingerprinted = []
    monkeypatch.setattr(
        flows.data.stage, "fingerprint", lambda *a: fingerprinted.append(1) or real(*a)
    )
    when = dt.datetime(2026, 12, 1, 3, 0, tzinfo=dt.timezone.utc)

    deferred = f"deferred: inputs still changing: {growing}"
    assert s.fire(when)["outcome"] == deferred
    with open(growing, "a") as f:
        f.write(document(50, 300)[500:])
    assert s.fire(when + dt.timedelta(minutes=1))["outcome"] == deferred
    assert not fingerprinted and not cluster.submitted

    os.utime(
        growing, (hour_ago, hour_ago)
    )  # an hour on, nobody wrote it again: its mtime is old now
    assert s.fire(when + dt.timedelta(hours=1))["outcome"] == "ran"
    assert fingerprinted and len(cluster.submitted) == 1

    # A file server whose clock runs ahead: an mtime that always looks recent. Two looks settle_s
    # apart that see the same size and mtime are settled; a change between them is not.
    ahead = time.time() + 7200
    late = corpus / "late.txt"
    late.write_text(document(51, 300))
    os.utime(late, (ahead, ahead))
    assert (
        s.fire(when + dt.timedelta(hours=2))["outcome"]
        == f"deferred: inputs still changing: {late}"
    )
    s.state["settle_look"]["at"] -= 600  # the first look, as if taken settle_s ago
    with open(late, "a") as f:
        f.write("one more line\n")
    os.utime(late, (ahead, ahead))
    assert (
        s.fire(when + dt.timedelta(hours=3))["outcome"]
        == f"deferred: inputs still changing: {late}"
    )
    s.state["settle_look"]["at"] -= 600
    assert s.fire(when + dt.timedelta(hours=4))["outcome"] == "ran"
    assert len(cluster.submitted) == 2 and "settle_look" not in s.state
    assert [h["outcome"].split(":")[0] for h in s.state["history"]] == [
        "deferred",
        "deferred",
        "ran",
        "deferred",
        "deferred",
        "ran",
    ]


def test_a_restarted_scheduler_re_attaches_to_the_job_in_flight_before_submitting_another(
    tmp_path, monkeypatch
):
    """The scheduler is killed while its job runs: the submission id is in the state file. The next
    scheduler waits for that job, records its trigger (under its own fire time) and only then
    submits the next one: never two jobs at once."""
    cfg = _config(_corpus(tmp_path / "corpus"), tmp_path / "w", settle_s=0)
    cluster = FakeJobs(monkeypatch, [Killed()], ["SUCCEEDED"])
    when = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)).replace(microsecond=0)
    first = Scheduler(cfg, cron="* * * * * *", address=ADDRESS)
    with pytest.raises(Killed):
        first.fire(when)
    (job,) = cluster.submitted
    flight = json.loads(first.state_path.read_text())["in_flight"]
    assert flight["submission_id"] == job and flight["fire_time"] == when.isoformat()

    cluster.jobs[job] = [
        "RUNNING",
        "RUNNING",
        "RUNNING",
        "SUCCEEDED",
    ]  # still running when the next one starts
    second = Scheduler(cfg, cron="* * * * * *", address=ADDRESS)
    cluster.after_submit = second.stopping.set
    assert second.loop(install_signals=False) == 0
    assert cluster.polls[job] == 1 + 4 and len(cluster.submitted) == 2
    assert cluster.overlapping == []  # the first job had ended when the second was submitted
    landed = second.state["history"][0]
    assert (landed["fire_time"], landed["outcome"], landed["job_id"]) == (
        when.isoformat(),
        "ran",
        job,
    )
    assert _history(second) == ["ran", "ran"] and "in_flight" not in second.state


def test_a_job_past_job_timeout_s_is_stopped_and_the_trigger_recorded_failed(tmp_path, monkeypatch):
    """A job that never ends is stopped through the Jobs API once schedule.job_timeout_s has passed
    since its submission, the trigger recorded `failed (timeout)`; the time counts from the
    submission, across a restart of the scheduler."""
    corpus = _corpus(tmp_path / "corpus")
    cluster = FakeJobs(monkeypatch, ["RUNNING"], [Killed(), "RUNNING"])
    s = Scheduler(_config(corpus, tmp_path / "w", settle_s=0, job_timeout_s=0.2), address=ADDRESS)
    entry = s.fire(dt.datetime(2026, 12, 1, 3, 0, tzinfo=dt.timezone.utc))
    assert (entry["outcome"], entry["job_status"]) == ("failed (timeout)", "STOPPED")
    assert cluster.stopped == cluster.submitted[:1] and "in_flight" not in s.state

    # Down for seven hours while its job ran on: the restarted scheduler stops it at once.
    cfg = _config(corpus, tmp_path / "w2", settle_s=0, job_timeout_s=6 * 3600)
    killed = Scheduler(cfg, address=ADDRESS)
    with pytest.raises(Killed):
        killed.fire(dt.datetime(2026, 12, 1, 3, 0, tzinfo=dt.timezone.utc))
    state = json.loads(killed.state_path.read_text())
    state["in_flight"]["submitted_at"] -= 7 * 3600
    killed.state_path.write_text(json.dumps(state))
    landed = Scheduler(cfg, address=ADDRESS).resume()
    assert (landed["outcome"], landed["job_id"]) == ("failed (timeout)", cluster.submitted[1])
    assert cluster.stopped == cluster.submitted
