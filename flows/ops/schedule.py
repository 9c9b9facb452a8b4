"""``gptflow schedule``: retrain on a cron schedule, or only when the corpus changed.

What it is: a small long-running process of ours (Ray has no cron; Ray Workflows is gone). Fire
times come from APScheduler's ``CronTrigger`` -- five crontab fields, or six with seconds first
(``"*/2 * * * * *"``, for tests) -- and one loop in one thread runs the triggers in order, so two
runs of one scheduler can never overlap. Each trigger:

1. takes the workdir's run lock (``<workdir>/schedule/run.lock``, a non-blocking ``fcntl`` lock that
   dies with its holders, so a crashed scheduler never leaves it held); held elsewhere (another
   scheduler's run): ``skipped: run in progress``;
2. with ``--on-new-data``, first checks that the local input files are settled (size and mtime
   unchanged for ``schedule.settle_s``: the newest mtime that old, or a second look that long after
   the first): a file still being written is neither fingerprinted nor trained on,
   ``deferred: inputs still changing: FILE``, and the next fire time looks again; then compares the
   corpus fingerprint (what names the preprocess output: the input files' content fingerprints, one
   ``stat`` per unchanged local file) with the one of the last successful run: unchanged:
   ``skipped: no new data``;
3. runs the pipeline: here, as a child process ``gptflow run`` that inherits the lock (so the lock
   is held while either lives, and a crash or out-of-memory kill of a run never takes the scheduler
   down), or with ``--address`` as a Ray job (a deterministic submission id per trigger time, so a
   resubmitted trigger is a no-op) that the scheduler waits for; ``ran`` or ``failed (STEP)``.

A submitted job is recorded in the state (``in_flight``) before the wait: a scheduler that was
killed or restarted re-attaches to it and waits for it before any new trigger fires. The wait is
bounded: ``schedule.job_timeout_s`` after the submission the job is stopped, ``failed (timeout)``.
A Jobs API that does not answer for a while is asked again (the job runs on regardless).

Whatever goes wrong inside one trigger -- fingerprinting, a submission, a dashboard that is away --
ends that trigger, not the scheduler: it is recorded as ``failed (PHASE error)`` with the error
(credentials redacted), and the loop goes on to the next fire time.

Fire times that pass while a run goes on are coalesced into one ``skipped: run in progress`` record
that counts them; fire times missed while the scheduler was down are counted the same way when it
starts again. Every trigger and its outcome is an MLflow run (``schedule`` in the pipeline's
experiment, through flows/tracking.py), and in ``<workdir>/schedule/<config hash>/state.json``
(counts, the last fire time, the last successful fingerprint, the job in flight, recent history): a
restarted scheduler continues where it was. SIGTERM (or SIGINT) stops the loop between runs: a run
in progress is finished first, then the state is written and the process exits 0.

What it is not: a job queue. Unchanged steps are skipped by the pipeline itself; a retrain after new
data re-does preprocessing and what is downstream of it (from ``models:/NAME@champion`` when the
config's ``init`` says so) and the promotion gate decides what becomes champion.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from flows.config import ConfigError, PipelineConfig, stable_hash, to_dict
from flows.workdir import atomic_write_text

log = logging.getLogger(__name__)

RAN, NO_NEW_DATA, IN_PROGRESS, FAILED = (
    "ran",
    "skipped: no new data",
    "skipped: run in progress",
    "failed",
)
DEFERRED = "deferred: inputs still changing"
EVENT = "schedule"
POLL_S = 2.0  # how often a submitted job's status is asked for
_HISTORY = 50
# Secrets a message may carry beside URLs' user:password (which redact_text replaces).
_SECRET_ENV = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "RAY_AUTH_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
)
_FAILED_STEP = re.compile(r"step '([\w-]+)' failed")


def cron_trigger(expr: str) -> Any:
    """APScheduler's CronTrigger for 5 crontab fields, or 6 with seconds first; ConfigError names
    `expr`."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    try:
        if len(fields) == 5:
            return CronTrigger.from_crontab(expr, timezone=dt.timezone.utc)
        if len(fields) == 6:
            names = ("second", "minute", "hour", "day", "month", "day_of_week")
            return CronTrigger(**dict(zip(names, fields, strict=True)), timezone=dt.timezone.utc)
    except ValueError as e:
        raise ConfigError(f"--cron {expr!r}: {e}") from None
    raise ConfigError(
        f"--cron {expr!r}: expected 5 crontab fields (minute hour day month weekday), or 6 with "
        "seconds first"
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _stamp(t: dt.datetime) -> str:
    return t.strftime("%Y%m%dT%H%M%SZ")


class Scheduler:
    """One scheduler: a config, a trigger rule, and its state on disk."""

    def __init__(
        self,
        cfg: PipelineConfig,
        cron: str | None = None,
        on_new_data: bool = False,
        address: str | None = None,
        run_args: list[str] | None = None,
    ):
        self.cfg, self.cron, self.on_new_data, self.address = cfg, cron, on_new_data, address
        self.run_args = list(run_args or [])
        self.trigger = cron_trigger(cron) if cron else None
        root = Path(cfg.workdir).resolve() / "schedule"
        self.lock_path = root / "run.lock"
        from flows.ops.jobs import run_identity

        self.dir = root / stable_hash(run_identity(cfg), self.run_args, length=12)
        self.state_path = self.dir / "state.json"
        self.state = self._load()
        self.stopping = threading.Event()

    # ----------------------------------------------------------------- state

    def _load(self) -> dict[str, Any]:
        if self.state_path.is_file():
            try:
                return json.loads(self.state_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(
                    f"{self.state_path}: unreadable scheduler state ({e}); move it away to start "
                    "afresh"
                ) from e
        return {"counts": {}, "last_fire": None, "last_success_fingerprint": None, "history": []}

    def _save(self) -> None:
        if self.trigger is not None:  # for `gptflow status`: the schedule, and when it fires next
            upcoming = self.trigger.get_next_fire_time(None, _now())
            self.state |= {
                "cron": self.cron,
                "next_fire": upcoming.isoformat() if upcoming else None,
            }
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.state_path, json.dumps(self.state, indent=2, sort_keys=True) + "\n")

    # ----------------------------------------------------------------- one trigger

    def fingerprint(self) -> str:
        """The corpus fingerprint: what names the preprocess output (input files' content
        identities)."""
        from flows import pipeline
        from flows.data.stage import fingerprint

        ctx = pipeline.context(self.cfg)
        fp = fingerprint(self.cfg.data, ctx)
        ctx.fingerprints.save()
        return stable_hash(fp, to_dict(self.cfg.data), length=32)

    @contextmanager
    def _run_lock(self) -> Iterator[int | None]:
        """The workdir's run lock, held while the block runs: its fd, or None when another run holds
        it."""
        import fcntl

        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            try:
                yield fd
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def fire(self, when: dt.datetime, coalesced: int = 0, reraise: bool = False) -> dict[str, Any]:
        """Run one trigger for fire time `when`; record and return its outcome.

        An exception inside the trigger is its outcome (``failed (PHASE error)``, recorded), not the
        scheduler's end; `reraise`: raised again after it is recorded (``--once``)."""
        with self._run_lock() as fd:
            if fd is None:
                return self._record(when, IN_PROGRESS, coalesced=coalesced)
            if self.state.get(
                "in_flight"
            ):  # an earlier trigger's job: it ends before another starts
                self._land(self.state["in_flight"])
            phase = "inputs"
            try:
                fp = None
                if self.on_new_data:
                    changing = self._changing()
                    if changing is not None:
                        return self._record(when, DEFERRED, coalesced=coalesced, file=changing)
                    fp = self.fingerprint()
                    if fp == self.state.get("last_success_fingerprint"):
                        return self._record(when, NO_NEW_DATA, coalesced=coalesced)
                if self.address:
                    phase = "submit"
                    return self._submit(when, coalesced, fp)
                phase = "run"
                outcome, detail = self._run_here(when, fd)
            except Exception as e:
                error = _error_text(e)
                log.error("trigger %s: %s failed: %s", _stamp(when), phase, error)
                entry = self._record(
                    when, FAILED, coalesced=coalesced, reason=f"{phase} error", error=error
                )
                if reraise:
                    raise
                return entry
            if outcome == RAN and fp is not None:
                self.state["last_success_fingerprint"] = fp
            return self._record(when, outcome, coalesced=coalesced, **detail)

    def _changing(self) -> str | None:
        """A local input file that may still be being written, or None when all are settled: each
        one's mtime is at least schedule.settle_s old, or its size and mtime are what a look
        settle_s earlier saw (a file server whose clock runs ahead makes mtimes look recent). The
        first look is kept in the state until it is settle_s old, so ticks closer together than that
        still compare two looks far enough apart."""
        from flows.data.stage import local_input_files

        settle = self.cfg.schedule.settle_s
        if settle <= 0:
            return None
        now = time.time()
        recent: dict[str, list[int]] = {}
        for path in local_input_files(self.cfg.data):
            try:
                st = os.stat(path)
            except FileNotFoundError:  # renamed or removed since it was listed: changing
                return path
            if now - st.st_mtime < settle:
                recent[path] = [st.st_size, st.st_mtime_ns]
        before = self.state.get("settle_look")
        old_enough = before is not None and now - before["at"] >= settle
        if old_enough:
            recent = {p: v for p, v in recent.items() if before["files"].get(p) != v}
        if not recent:
            self.state.pop("settle_look", None)
            return None
        if before is None or old_enough:
            self.state["settle_look"] = {"at": now, "files": recent}
        return next(iter(recent))

    def _run_here(self, when: dt.datetime, lock_fd: int) -> tuple[str, dict[str, Any]]:
        """`gptflow run` as a child process that holds the run lock too; its output in
        runs/<when>.log."""
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "config.yaml"
        from flows.tracking import shareable_config, tracking_uri

        # The file holds no credentials: the child gets the full tracking URI through its
        # environment.
        atomic_write_text(config, yaml.safe_dump(shareable_config(self.cfg), sort_keys=False))
        env = dict(os.environ)
        if self.cfg.tracking.enabled:
            env["MLFLOW_TRACKING_URI"] = tracking_uri(self.cfg.tracking, self.cfg.workdir)
        log_path = self.dir / "runs" / f"{_stamp(when)}.log"
        log_path.parent.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(config), *self.run_args]
        log.info("trigger %s: running the pipeline (log: %s)", _stamp(when), log_path)
        with open(log_path, "wb") as out:
            # Its own session: a SIGTERM/SIGINT meant for the scheduler does not cut the run short.
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(lock_fd,),
                start_new_session=True,
                env=env,
            )
            code = proc.wait()
        detail: dict[str, Any] = {"log": str(log_path), "exit_code": code}
        if code == 0:
            return RAN, detail
        return FAILED, detail | {
            "step": _failed_step(log_path.read_text(encoding="utf-8", errors="replace"))
        }

    def _submit(self, when: dt.datetime, coalesced: int, fp: str | None) -> dict[str, Any]:
        """Submit the pipeline as a Ray job under the trigger's id, note it in the state (a
        restarted scheduler re-attaches to it), then wait for it and record the trigger."""
        from flows.ops import jobs

        sid = jobs.trigger_id(self.cfg, _stamp(when))
        job_id, new = jobs.submit(self.cfg, self.address, self.run_args, submission_id=sid)
        self.state["in_flight"] = {
            "submission_id": job_id,
            "fire_time": when.isoformat(),
            "coalesced": coalesced,
            "fingerprint": fp,
            "address": self.address,
            "resubmitted": not new,
            "submitted_at": time.time(),
        }
        self._save()
        return self._land(self.state["in_flight"])

    def resume(self) -> dict[str, Any] | None:
        """Re-attach to the job the state names in flight (the scheduler was stopped or killed while
        it waited): wait for it and record its trigger before anything new fires. None when there is
        none, or another run holds the lock (then the next trigger re-attaches)."""
        if not self.state.get("in_flight"):
            return None
        with self._run_lock() as fd:
            if fd is None:
                log.warning(
                    "job %s is still in flight, but another run holds %s: re-attaching at the next "
                    "trigger",
                    self.state["in_flight"]["submission_id"],
                    self.lock_path,
                )
                return None
            return self._land(self.state["in_flight"])

    def _land(self, flight: dict[str, Any]) -> dict[str, Any]:
        """Wait for the job in flight, record its trigger's outcome (under its own fire time),
        forget it."""
        when = dt.datetime.fromisoformat(flight["fire_time"])
        log.info("trigger %s: waiting for job %s", _stamp(when), flight["submission_id"])
        try:
            outcome, detail = self._await(flight)
        except (
            Exception
        ) as e:  # what _await does not expect: still this trigger's outcome, not the loop's end
            outcome, detail = FAILED, {"reason": "job error", "error": _error_text(e)}
        detail = {
            "job_id": flight["submission_id"],
            "resubmitted": flight.get("resubmitted", False),
            **detail,
        }
        self.state.pop("in_flight", None)
        if outcome == RAN and flight.get("fingerprint"):
            self.state["last_success_fingerprint"] = flight["fingerprint"]
        return self._record(when, outcome, coalesced=flight.get("coalesced", 0), **detail)

    def _await(self, flight: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The outcome of the job in flight once it ends, or once schedule.job_timeout_s has passed
        since its submission (then it is stopped). A Jobs API that does not answer is asked again
        until then; a stop request does not abandon the job: it is waited for."""
        from flows.ops import jobs

        job_id = flight["submission_id"]
        address = self.address or flight.get("address")
        deadline = flight["submitted_at"] + self.cfg.schedule.job_timeout_s
        client, state, failing = None, None, False
        while True:
            try:
                client = client or jobs.client(address, self.cfg.cluster.allow_no_auth)
                state = jobs.status(client, job_id)["status"]
                if failing:
                    log.info("job %s: the Jobs API answers again", job_id)
                failing = False
            except jobs.NoSuchJob as e:
                return FAILED, {"reason": "job lost", "error": _error_text(e)}
            except Exception as e:  # a dashboard blip: said once per spell, then asked again
                if not failing:
                    log.warning(
                        "job %s: the Jobs API does not answer (%s); asking again until it does or "
                        "the job's time is up",
                        job_id,
                        _error_text(e),
                    )
                failing = True
            if state in jobs.TERMINAL:
                break
            if time.time() >= deadline:
                return FAILED, {"reason": "timeout", "job_status": self._stop(client, job_id)}
            time.sleep(
                POLL_S
            )  # not stopping.wait: once a stop is requested, that would ask without a pause
        detail: dict[str, Any] = {"job_status": state}
        if state == "SUCCEEDED":
            return RAN, detail
        try:
            step = _failed_step(jobs.logs(client, job_id))
        except Exception as e:
            log.warning("job %s: its logs could not be read (%s)", job_id, _error_text(e))
            step = None
        return FAILED, detail | {"step": step}

    def _stop(self, client: Any, job_id: str) -> str:
        """Stop a job that ran out of time; its last status, or why it could not be stopped."""
        from flows.ops import jobs

        log.error(
            "job %s: still running after schedule.job_timeout_s=%g s: stopping it",
            job_id,
            self.cfg.schedule.job_timeout_s,
        )
        try:
            if client is None:
                raise ConnectionError("no answer from the Jobs API")
            return jobs.stop(client, job_id)
        except Exception as e:
            error = _error_text(e)
            log.error(
                "job %s: could not be stopped (%s); stop it with `gptflow jobs stop %s`",
                job_id,
                error,
                job_id,
            )
            return f"not stopped: {error}"

    def _record(
        self, when: dt.datetime, outcome: str, coalesced: int = 0, **detail: Any
    ) -> dict[str, Any]:
        from flows.tracking import record_event

        counts = self.state.setdefault("counts", {})
        counts["triggers"] = counts.get("triggers", 0) + 1
        counts[outcome] = counts.get(outcome, 0) + 1
        counts["coalesced"] = counts.get("coalesced", 0) + coalesced
        shown = outcome
        if outcome == FAILED and (why := detail.get("step") or detail.get("reason")):
            shown = f"{outcome} ({why})"
        elif outcome == DEFERRED:
            shown = f"{outcome}: {detail['file']}"
        entry = {
            "fire_time": when.isoformat(),
            "outcome": shown,
            "coalesced": coalesced,
            "seq": counts["triggers"],
            **detail,
        }
        self.state["last_fire"] = when.isoformat()
        self.state["history"] = (self.state.get("history", []) + [entry])[-_HISTORY:]
        self._save()
        try:
            record_event(
                self.cfg.tracking,
                self.cfg.workdir,
                EVENT,
                {
                    "gptflow.trigger.fire_time": when.isoformat(),
                    "gptflow.trigger.outcome": shown,
                    "gptflow.trigger.seq": counts["triggers"],
                    "gptflow.trigger.mode": "submit" if self.address else "here",
                    **{f"gptflow.trigger.{k}": v for k, v in detail.items() if v is not None},
                },
                {"coalesced_triggers": coalesced},
            )
        except Exception as e:  # the tracking server being away must not stop the schedule
            log.warning("trigger %s: could not record it in MLflow (%s)", _stamp(when), e)
        log.info(
            "trigger %s: %s%s",
            _stamp(when),
            shown,
            f" (+{coalesced} coalesced)" if coalesced else "",
        )
        return entry

    # ----------------------------------------------------------------- the loop

    def _missed(self, after: dt.datetime, until: dt.datetime) -> tuple[int, dt.datetime | None]:
        """How many fire times lie in (after, until], and the last of them."""
        n, last, t = 0, None, after
        while True:
            t = self.trigger.get_next_fire_time(t, t + dt.timedelta(microseconds=1))
            if t is None or t > until:
                return n, last
            n, last = n + 1, t

    def loop(self, install_signals: bool = True) -> int:
        """Fire on the cron schedule until SIGTERM/SIGINT (or `stopping` is set); returns 0."""
        if self.trigger is None:
            raise ConfigError("gptflow schedule needs --cron EXPR, or --once")
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stopping.set())
        self.resume()  # a job a killed scheduler was waiting for: it ends before anything new fires
        pending = 0
        if self.state.get("last_fire"):  # continue where we were: what passed while we were down
            missed, _ = self._missed(dt.datetime.fromisoformat(self.state["last_fire"]), _now())
            if missed:
                log.info(
                    "%d fire time(s) passed while the scheduler was not running: coalesced", missed
                )
                pending = missed
        self.state["started"] = _now().isoformat()
        self._save()
        prev = _now()
        while not self.stopping.is_set():
            when = self.trigger.get_next_fire_time(prev, prev)
            if when is None:
                break
            if self.stopping.wait(max(0.0, (when - _now()).total_seconds())):
                break
            self.fire(when, coalesced=pending)
            pending = 0
            # Fire times that passed during that trigger's run: never a second run, one record
            # counting them.
            busy, last = self._missed(when, _now())
            if busy:
                self._record(last, IN_PROGRESS, coalesced=busy)
                when = last
            prev = when
        self.state["stopped"] = _now().isoformat()
        self._save()
        log.info("scheduler stopped between runs; state in %s", self.state_path)
        return 0


def _error_text(e: BaseException) -> str:
    """An exception as one line for the state file, MLflow and logs: credentials in URLs and the
    secrets this process holds (MLflow password or token, Ray token) replaced by ***."""
    from flows.redact import REDACTED, redact_text

    text = redact_text(f"{type(e).__name__}: {e}")
    for name in _SECRET_ENV:
        secret = os.environ.get(name, "")
        if len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return " ".join(text.split())[:1000]


def _failed_step(text: str) -> str | None:
    found = _FAILED_STEP.findall(text)
    return found[-1] if found else None


def run_schedule(
    cfg: PipelineConfig,
    cron: str | None,
    on_new_data: bool,
    address: str | None,
    once: bool,
    run_args: list[str],
    on_start: Callable[[Scheduler], None] | None = None,
) -> str:
    """The `gptflow schedule` command: one trigger now (--once) or the loop; returns what to
    print."""
    scheduler = Scheduler(cfg, cron, on_new_data, address, run_args)
    if on_start:
        on_start(scheduler)
    if once:
        scheduler.resume()
        entry = scheduler.fire(_now(), reraise=True)
        if entry["outcome"].startswith(FAILED):
            raise RuntimeError(
                f"scheduled run failed: {entry['outcome']} "
                f"(log: {entry.get('log') or entry.get('job_id')})"
            )
        return entry["outcome"]
    scheduler.loop()
    counts = scheduler.state.get("counts", {})
    return "stopped; triggers so far: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
