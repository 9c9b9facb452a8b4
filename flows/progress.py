"""Progress as a seam (STYLE 18): stages report what they do, the command line decides how it looks.

A stage calls ``ctx.progress.update(task, done, total, unit, **figures)`` as work advances (a
training step, a preprocessing work unit) and ``ctx.progress.note(text)`` when it starts something
worth naming ("scoring 20,480 validation tokens"). The base :class:`Progress` drops everything, so a
stage run from a notebook or a test prints nothing; ``gptflow`` hands the stages its console
(flows/console.py), which draws one updating line on a terminal and plain lines in logs.

Training runs in Ray workers, not in the driver: :class:`Relay` is the small Ray actor rank 0 sends
its step to (fire-and-forget, at most every ``SEND_EVERY_S``) and :func:`relayed` the driver-side
thread that forwards the latest one to the console. bench/progress.py measures what that costs a
step.

What it is not: logging (the console routes records) or metrics (MLflow has those).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Progress:
    """Where stages report; this one discards every report (library use, tests)."""

    def update(
        self, task: str, done: int, total: int | None = None, unit: str = "step", **figures: float
    ) -> None:
        """`task` has done `done` of `total` `unit`s; `figures` (loss, tokens_per_s, docs_per_s,
        ...) say how."""

    def note(self, text: str) -> None:
        """What the stage is doing now, in a few words."""

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Path | None]:
        """The pipeline runner wraps each step it runs in this; yields the step's log file, if
        any."""
        yield None


SEND_EVERY_S = 0.5  # how often rank 0 sends its step: a terminal line needs no more


class Relay:
    """A Ray actor (no CPU) holding the latest step rank 0 sent; the driver takes it."""

    def __init__(self) -> None:
        self._latest: dict[str, Any] | None = None

    def put(self, state: dict[str, Any]) -> None:
        self._latest = state

    def take(self) -> dict[str, Any] | None:
        state, self._latest = self._latest, None
        return state


class Sender:
    """Rank 0's end: ``step(k, n, **figures)`` every step; a call sends at most every SEND_EVERY_S,
    and always the last step. Costs one clock read per step, one actor call (not waited on) per
    send."""

    def __init__(self, relay: Any | None, every_s: float = SEND_EVERY_S):
        self._relay, self._every, self._last = relay, every_s, 0.0

    def step(self, done: int, total: int, **figures: float) -> None:
        if self._relay is None:
            return
        now = time.monotonic()
        if now - self._last >= self._every or done == total:
            self._last = now
            self._relay.put.remote({"done": done, "total": total, **figures})


@contextlib.contextmanager
def relayed(
    progress: Progress, task: str, unit: str = "step", poll_s: float = 0.5
) -> Iterator[Any]:
    """A :class:`Relay` actor for the workers (yielded; None when progress is not shown) and a
    thread forwarding its latest state to `progress` until the block ends."""
    if type(progress) is Progress:  # nobody is looking: no actor, no thread
        yield None
        return
    import ray

    relay = ray.remote(num_cpus=0)(Relay).remote()
    stop = threading.Event()

    def forward() -> None:
        while True:
            stopping = stop.wait(poll_s)  # then one last take: the final step
            try:
                state = ray.get(relay.take.remote(), timeout=10)
            except Exception:  # noqa: BLE001 -- progress must never fail a run; try again next poll
                state = None
            if state:
                progress.update(task, state.pop("done"), state.pop("total"), unit, **state)
            if stopping:
                return

    thread = threading.Thread(target=forward, name=f"progress-{task}", daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        stop.set()
        thread.join(timeout=15)  # the last poll forwards the final step
        ray.kill(relay)
