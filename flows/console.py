"""The terminal of a pipeline command (`gptflow run`, a stage command): the one place that decides
what the user sees and routes everything else to log files.

What the terminal shows, by default: the pipeline's own log lines (gptflow's loggers, at INFO), one
line per step naming its log, live progress (flows/progress.py: one updating line on a terminal;
on a pipe -- ``ray job logs``, CI -- a plain line when a task starts, at least every ``every_s``
seconds while it runs, and when it ends), errors, and the command's result. Everything else -- Ray's
driver and worker output (``log_to_driver``), DeepSpeed's logger, MLflow's messages and warnings,
Python warnings, library progress bars, C-level writes to stdout/stderr -- goes to
``<workdir>/logs/<step>.log`` while a step runs and ``<workdir>/logs/gptflow.log`` between steps.

How: file descriptors 1 and 2 are pointed at the current log file (``dup2``), so whatever writes to
them lands there, whoever it is; the terminal is kept as a duplicate of the original stderr. With
``-v`` nothing is routed: everything prints as it comes, as before (progress as plain lines).

Progress lines (not the pipeline's own lines) start with :data:`MARK`, so a script or a test can
tell them apart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from flows.progress import Progress

MARK = "  > "
"""What every progress line begins with."""

_OURS = ("flows", "gptflow", "gptcore")  # loggers whose INFO lines are the pipeline's own


@dataclass
class _Task:
    name: str
    unit: str
    total: int | None
    started: float
    first: int
    done: int = 0
    last: float = 0.0
    """When the stage last reported."""
    figures: dict[str, float] = field(default_factory=dict)
    note: str = ""


def _human(x: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{suffix}"
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.2g}"


def duration(seconds: float) -> str:
    """3 s, 1m05s, 2h03m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


_FIGURES = {
    "loss": lambda v: f"loss {v:.3f}",
    "tokens_per_s": lambda v: f"{_human(v)} tok/s",
    "docs_per_s": lambda v: f"{_human(v)} docs/s",
}


def render(task: _Task, now: float) -> str:
    """``pretrain  step 120/300  loss 3.412  14.2k tok/s  ETA 1m12s`` (or the task's note)."""
    if task.total is None and not task.done:
        return f"{task.name}  {task.note}  ({duration(now - task.started)})"
    count = (
        f"step {task.done}/{task.total}"
        if task.unit == "step"
        else f"{task.done}/{task.total} {task.unit}"
    )
    parts = [task.name, count]
    parts += [_FIGURES[k](v) if k in _FIGURES else f"{k} {v:.4g}" for k, v in task.figures.items()]
    if task.total and task.done >= task.total:
        parts.append(f"in {duration(now - task.started)}")
    elif task.total and task.done > task.first and now > task.started:
        rate = (task.done - task.first) / (now - task.started)
        parts.append(f"ETA {duration((task.total - task.done) / rate)}")
    return "  ".join(parts)


class Console(Progress):
    """Progress drawn on the terminal, and (unless `verbose`) output routed to `<workdir>/logs/`.

    Use as a context manager around the command; ``terminal`` is the real stderr while it is open.
    """

    def __init__(
        self,
        workdir: str | Path,
        verbose: bool = False,
        every_s: float = 10.0,
        terminal: TextIO | None = None,
    ):
        self.logs = Path(workdir) / "logs"
        self.verbose, self.every_s = verbose, every_s
        self.terminal: TextIO = terminal or sys.stderr
        self.failed_log: Path | None = None
        """The log of the step that raised (for the error message)."""
        self._lock = threading.RLock()
        self._saved: dict[int, int] = {}
        self._file: TextIO | None = None
        self._handlers: list[logging.Handler] = []
        self._task: _Task | None = None
        self._step: tuple[str, float] | None = None
        self._drawn = False
        self._last_out = time.monotonic()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self.tty = False

    # ------------------------------------------------------------------ routing

    def __enter__(self) -> Console:
        if not self.verbose:
            try:
                self.logs.mkdir(parents=True, exist_ok=True)
            except OSError:
                self.verbose = (
                    True  # the stage reports the unwritable workdir itself, with its own error
                )
        if not self.verbose:
            self._start_routing()
        self.tty = self.terminal.isatty() and not self.verbose
        self._ticker = threading.Thread(target=self._tick, name="console", daemon=True)
        self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_routing(self) -> None:
        # Ray holds repeated worker lines back for seconds to count them; a log file wants them now,
        # in the log of the step that printed them. Read when ray is imported, i.e. later.
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self._saved = {fd: os.dup(fd) for fd in (1, 2)}
        self.terminal = os.fdopen(
            os.dup(self._saved[2]), "w", buffering=1, encoding="utf-8", errors="replace"
        )
        self._route(self.logs / "gptflow.log", "a")
        from flows.redact import RedactingFilter

        root = logging.getLogger()
        for h in list(root.handlers):  # the CLI's basicConfig handler: to the log file instead
            root.removeHandler(h)
        to_file = logging.StreamHandler(sys.stderr)  # fd 2: the current log file
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        to_terminal = _TerminalHandler(self)
        to_terminal.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        to_terminal.addFilter(lambda r: r.name.split(".")[0] in _OURS)
        for h in (to_file, to_terminal):
            h.addFilter(RedactingFilter())
            root.addHandler(h)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)  # warnings.warn -> the py.warnings logger -> the log file
        self._handlers = [to_file, to_terminal]

    def _route(self, path: Path, mode: str) -> None:
        """Point fds 1 and 2 at `path` (Python's streams flushed first, so nothing lands in the
        wrong file)."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        # SIM115: the file stays open here; it is closed on the next route.
        new = open(path, mode, encoding="utf-8", errors="replace")  # noqa: SIM115
        if self._file is None:  # the command's first line in gptflow.log
            new.write(
                f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} gptflow {' '.join(sys.argv[1:])}\n"
            )
            new.flush()
        os.dup2(new.fileno(), 1)
        os.dup2(new.fileno(), 2)
        if self._file is not None:
            self._file.close()
        self._file = new

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
            self._ticker = None
        with self._lock:
            self._clear()
        if not self._saved:
            return
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._saved = {}
        root = logging.getLogger()
        for h in self._handlers:
            root.removeHandler(h)
        root.addHandler(logging.StreamHandler(sys.stderr))  # anything logged at exit still shows
        if self._file is not None:
            self._file.close()
            self._file = None
        self.terminal.flush()

    # ------------------------------------------------------------------ the pipeline's steps

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Path | None]:
        log_file = self.logs / f"{name}.log"
        routed = bool(self._saved)
        self.line(
            f"{time.strftime('%H:%M:%S')} {name}: running"
            + (f" (log: {shown(log_file)})" if routed else "")
        )
        with self._lock:
            self._step, self._task = (name, time.monotonic()), None
        if routed:
            self._route(log_file, "w")
        try:
            yield log_file if routed else None
        except BaseException:
            self.failed_log = log_file if routed else None
            raise
        finally:
            with self._lock:
                self._clear()
                self._step, self._task = None, None
            if routed:
                self._route(self.logs / "gptflow.log", "a")

    # ------------------------------------------------------------------ what stages report

    def update(
        self, task: str, done: int, total: int | None = None, unit: str = "step", **figures: float
    ) -> None:
        with self._lock:
            now = time.monotonic()
            t = self._task
            new = (
                t is None or t.name != task or t.total is None or done < t.done
            )  # (a note is no count)
            if new:
                t = self._task = _Task(task, unit, total, now, done)
            t.done, t.total, t.figures, t.last = done, total, figures, now
            finished = total is not None and done >= total
            text = render(t, now)
            if self.tty:
                self._draw(text)
                if finished:
                    self._write("")  # keeps the final line on screen
            elif new or finished or now - self._last_out >= self.every_s:
                self._write(MARK + text)
            if finished:
                self._task = None

    def note(self, text: str) -> None:
        with self._lock:
            now = time.monotonic()
            name = self._step[0] if self._step else "gptflow"
            self._task = _Task(name, "", None, now, 0, note=text)
            if self.tty:
                self._draw(render(self._task, now))
            else:
                self._write(MARK + f"{name}  {text}")

    # ------------------------------------------------------------------ drawing

    def line(self, text: str) -> None:
        """A permanent line (a log record, a step starting): above the progress line, if one is
        drawn."""
        with self._lock:
            drawn = self._drawn
            self._clear()
            self._write(text)
            if drawn and self._task is not None:
                self._draw(render(self._task, time.monotonic()))

    def _write(self, text: str) -> None:
        self.terminal.write(text + "\n")
        self.terminal.flush()
        self._drawn = False
        self._last_out = time.monotonic()

    def _draw(self, text: str) -> None:
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.terminal.write("\r\x1b[K" + (MARK + text)[:width])
        self.terminal.flush()
        self._drawn = True
        self._last_out = time.monotonic()

    def _clear(self) -> None:
        if self._drawn:
            self.terminal.write("\r\x1b[K")
            self.terminal.flush()
            self._drawn = False

    def _tick(self) -> None:
        """While a step runs: on a terminal the line keeps counting; on a pipe, a line every every_s
        seconds even when the stage reports nothing (slow start-up, a long step), so a slow run is
        never mistaken for a hung one."""
        while not self._stop.wait(1.0):
            with self._lock:
                if self._step is None:
                    continue
                now = time.monotonic()
                name, t0 = self._step
                if self.tty:
                    task = self._task or _Task(name, "", None, t0, 0, note="running")
                    self._draw(render(task, now))
                elif now - self._last_out >= self.every_s:
                    task = self._task
                    if task is None:
                        self._write(f"{MARK}{name}  running for {duration(now - t0)}")
                    elif task.total is None:  # a note: how long it has been doing it
                        self._write(MARK + render(task, now))
                    else:
                        self._write(
                            f"{MARK}{render(task, now)}  "
                            f"(last report {duration(now - task.last)} ago)"
                        )


class _TerminalHandler(logging.Handler):
    def __init__(self, console: Console):
        super().__init__(logging.INFO)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.line(self.format(record))
        except Exception:  # noqa: BLE001 -- logging never raises into the caller
            self.handleError(record)


def shown(path: Path) -> str:
    """`path` relative to the current directory when it is below it (work/logs/x.log), else
    absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())
