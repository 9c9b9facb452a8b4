"""The schedule section: how `gptflow schedule` waits for its inputs and its Ray job. Read by
flows/ops/schedule.py; composed into the pipeline's config by flows/config.py."""

from __future__ import annotations

from dataclasses import dataclass

from flows.configlib import check, check_finite


@dataclass(frozen=True)
class ScheduleConfig:
    """`gptflow schedule`: how a trigger waits for its inputs and for its Ray job (when it fires and
    what it runs are the command's --cron, --on-new-data and --address)."""

    settle_s: float = 60.0
    """Seconds the local input files must have kept their size and mtime before a data-triggered run
    (--on-new-data) fingerprints them: a file still being written defers the trigger to the next
    fire time (`deferred: inputs still changing: FILE`). 0 turns the wait off."""
    job_timeout_s: float = 6 * 3600.0
    """Longest wait for a submitted run's Ray job (--address), from its submission; then the job is
    stopped and the trigger recorded as `failed (timeout)`."""

    def __post_init__(self) -> None:
        check_finite(self)
        check(self.settle_s >= 0, "settle_s", self.settle_s, ">= 0 (0: no wait)")
        check(self.job_timeout_s > 0, "job_timeout_s", self.job_timeout_s, "> 0")
