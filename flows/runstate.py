"""What the pipeline runner records about the run in progress (or the last one), for
`gptflow status`.

One small JSON file, ``<workdir>/logs/run.json``, rewritten atomically as the run goes: when it
started, by which process, and per step its state (``done``: reused; ``ran``; ``running``;
``failed`` with the error; ``not run``), start time, seconds, output directory and log file. It
holds no figures: `gptflow status` reads those from the steps' outputs and MLflow.

What it is not: the truth about outputs (each output's DONE is) or a lock (flows/workdir.py has
those).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from flows.workdir import atomic_write_text

FILE = Path("logs") / "run.json"


def path(workdir: str | Path) -> Path:
    return Path(workdir) / FILE


class RunState:
    """The runner's record of one run; every change is written at once (a crash leaves the last
    state)."""

    def __init__(self, workdir: str | Path, planned: list[Any]):
        self.file = path(workdir)
        self.state: dict[str, Any] = {
            "started": time.time(),
            "finished": None,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": sys.argv[1:],
            "parent_run_id": None,
            "steps": {
                p.step.name: {
                    "state": "done" if p.done else "not run",
                    "out": str(p.out),
                    "started": None,
                    "seconds": None,
                    "log": None,
                }
                for p in planned
            },
        }

    def write(self) -> None:
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.file, json.dumps(self.state, indent=2, sort_keys=True) + "\n")
        except OSError:  # a read-only or full workdir fails the step itself, with its own error
            pass

    def step(
        self,
        name: str,
        state: str,
        seconds: float | None = None,
        error: str | None = None,
        log: Path | None = None,
    ) -> None:
        s = self.state["steps"][name]
        s["state"] = state
        if state == "running":
            s["started"] = time.time()
        if seconds is not None:
            s["seconds"] = round(seconds, 3)
        if error is not None:
            s["error"] = error
        if log is not None:
            s["log"] = str(log)
        self.write()

    def finish(self, parent_run_id: str | None = None) -> None:
        self.state["finished"] = time.time()
        self.state["parent_run_id"] = parent_run_id
        self.write()


def read(workdir: str | Path) -> dict[str, Any] | None:
    """The last run's record, or None when this workdir has none (or an unreadable one)."""
    try:
        return json.loads(path(workdir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
