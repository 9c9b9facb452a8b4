"""Fault injection for the tests of the training loop: a worker that exits, a loss that turns NaN.

What it is: the one place that reads ``GPTFLOW_FAULT_INJECT`` (test-only, never set in normal use),
e.g. ``GPTFLOW_FAULT_INJECT="fail_at_step=6,nan_at_step=1"``. The driver reads it from its own
environment and hands it to the Ray Train workers' environment (:func:`worker_env`); the loop asks
:func:`exit_once` and :func:`poison` at each step. The resilience tests use it to prove that a lost
worker resumes to the same weights and that a NaN loss skips its update.

What it is not: configuration. A user's TrainConfig says nothing about faults, and a run's output
hash and resume identity do not depend on them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ENV = "GPTFLOW_FAULT_INJECT"


@dataclass(frozen=True)
class Faults:
    """The faults a run is asked to suffer; -1: none."""

    fail_at_step: int = -1
    """At this step rank 1 (rank 0 if alone) exits, once per run (local storage only)."""
    nan_at_step: int = -1
    """At this step rank 0's first micro-batch loss becomes NaN, the graph intact."""


def parse(text: str) -> Faults:
    """``"fail_at_step=6,nan_at_step=1"`` -> Faults; an unknown key or a bad value raises
    ValueError."""
    known = {f.name for f in dataclasses.fields(Faults)}
    values: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in known or not value.lstrip("-").isdigit() or int(value) < -1:
            raise ValueError(
                f"{ENV}={text!r}: {item!r} is not one of {', '.join(sorted(known))} "
                "set to an integer >= -1"
            )
        values[key] = int(value)
    return Faults(**values)


def encode(faults: Faults) -> str:
    """The environment value that :func:`parse` reads back as `faults` (only what is set)."""
    return ",".join(f"{k}={v}" for k, v in dataclasses.asdict(faults).items() if v != -1)


def from_env() -> Faults:
    return parse(os.environ.get(ENV, ""))


def worker_env() -> dict[str, str]:
    """The driver's fault injection, for the workers' ``runtime_env`` (empty when there is none).

    Ray workers inherit the raylet's environment, fixed when Ray started; a test sets the variable
    later, in the driver, so the driver passes it on with each fit.
    """
    value = os.environ.get(ENV, "")
    if value:
        parse(value)  # a typo fails in the driver, not on every worker
        return {ENV: value}
    return {}


def marker(storage_path: str, run_name: str, step: int) -> Path | None:
    """Where the injected exit records that it happened (the restarted worker then passes the step);
    None on remote storage, where the loop does not inject it."""
    if "://" in storage_path:
        return None
    return Path(storage_path) / run_name / f"injected_failure_step{step}"


def exit_once(
    faults: Faults, step: int, rank: int, world: int, storage_path: str, run_name: str
) -> None:
    """Rank 1 (rank 0 if alone) exits the process at ``faults.fail_at_step``, the first time
    only."""
    if step != faults.fail_at_step or rank != min(1, world - 1):
        return
    path = marker(storage_path, run_name, step)
    if path is None or path.exists():  # once per run: the restarted worker passes this step
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"rank {rank} exited at step {step}\n")
    log.warning("injected failure: rank %d exits at step %d", rank, step)
    os._exit(1)


def poison(faults: Faults, loss: torch.Tensor, step: int, micro: int, rank: int) -> torch.Tensor:
    """`loss`, or NaN on rank 0's first micro-batch at ``faults.nan_at_step``; the other ranks learn
    of it only through the loop's all-reduced flag."""
    if step == faults.nan_at_step and micro == 0 and rank == 0:
        return loss + float("nan")
    return loss
