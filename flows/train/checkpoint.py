"""Resume checkpoints, both sides: the driver's resume guard and the workers' save and load.

What it is: the Ray run ``<storage_path>/<run_name>`` is the "place" of a run; a fit under a name
that already holds checkpoints resumes from the latest one (Ray Train's behaviour).
:func:`check_resume` (driver) refuses to resume a run with a config it was not trained with, or into
fewer steps than its newest checkpoint. :func:`save_checkpoint` / :func:`load_checkpoint` (every
worker) write and read DeepSpeed's per-rank state, the loop state and RNG states through
``ray.train.report(checkpoint=...)``.

Integrity: DeepSpeed loads its checkpoint files with pickle, so a file changed in storage runs code
in every worker. Each rank records the sha256 and size of every file it wrote, before it leaves the
machine, in ``sha256_rank<r>.json`` beside them; a checkpoint is complete when the loop state and
every rank's record are there with every file they list, and nothing is loaded unless its files
match: the driver verifies the checkpoint it will resume from before any worker starts (local
storage), each worker its own and rank 0's files before DeepSpeed opens them. The records live in
the same storage, so they catch corruption, partial copies and mix-ups, not someone who can write
there (the README calls checkpoint storage a trust boundary).

What it is not: the exported model bundle (what everything else loads; flows/train/loop.py writes
it).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.config import ConfigError, flatten, to_dict
from flows.workdir import atomic_write_text, sha256_file

if TYPE_CHECKING:
    from flows.train.prepare import RunSpec

log = logging.getLogger(__name__)

RESUME_FILE = "gptflow_resume.json"


class CheckpointError(ValueError):
    """A resume checkpoint that is incomplete or whose files differ from what was recorded when it
    was written; the message names the file."""


# TrainConfig fields a resumed run may change: they do not enter the weights (what is logged, kept
# or retried, where it runs) -- plus `steps`, which is what resuming into more steps changes.
_RESUMABLE_CHANGES = (
    "steps",
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "keep_checkpoints",
    "max_failures",
    "max_skipped_updates",
    "peak_flops_per_device",
    "sample_prompts",
    "sample_tokens",
    "cpus_per_worker",
    "global_batch_size",
)


def resume_identity(p: RunSpec) -> dict[str, Any]:
    """What a run's checkpoints depend on, beside its step count: must match to resume under its
    name."""
    train = {
        k: v
        for k, v in to_dict(p.train).items()
        if k not in _RESUMABLE_CHANGES and k not in _NAMES_ONLY
    }
    identity = {
        "stage": p.stage,
        "train": train,
        "model": p.gpt_config,
        "dataset_manifest_sha256": p.dataset.manifest_sha256,
        "parent": p.parent,
    }
    if (
        p.teacher
    ):  # distillation: the student's weights also depend on which teacher it learned from
        identity["teacher"] = p.teacher["lineage"]
    return identity


# Keys that name inputs, places or what happens after training, not what a checkpoint holds.
_NAMES_ONLY = ("data", "init", "run_name", "storage_path", "enabled", "teacher", "registry_name")


def check_resume(p: RunSpec) -> None:
    """Refuse to resume the run ``<storage_path>/<run_name>`` with a config it was not trained with.

    Ray resumes any run under a re-used name; without this check a changed lr, model or dataset
    would silently continue from weights trained otherwise, under an output hash that does not say
    so. Records the identity for the next call, and before a resume verifies the checkpoint it will
    resume from (:func:`verify_checkpoint`). Local storage only (the workers still verify s3://...).
    """
    if "://" in p.storage_path:
        return
    path = Path(p.storage_path) / p.run_name / RESUME_FILE
    ours = json.loads(json.dumps(resume_identity(p)))
    if path.is_file():
        try:
            theirs = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"{path}: unreadable resume identity ({e}); use another run_name"
            ) from e
        if theirs != ours:
            a, b = flatten(ours), flatten(theirs)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ConfigError(
                f"{p.stage}.run_name={p.run_name!r}: {path.parent} holds a run trained with a "
                f"different {', '.join(diff)}; resuming it would continue from those weights. Use "
                f"another run_name (only {', '.join(_RESUMABLE_CHANGES)} may change when resuming)"
            )
        latest = latest_checkpoint(path.parent)
        reached = _step_of(latest) if latest is not None else None
        if reached is not None and reached > p.train.steps:
            # Caught here, before any worker starts; the training loop refuses it too (remote
            # storage).
            raise ConfigError(
                f"{p.stage}.steps={p.train.steps}: run {p.run_name!r} in {path.parent} has a "
                f"checkpoint at step {reached}; a run resumes into the same or more steps, never "
                f"fewer. Use steps >= {reached} or another run_name"
            )
        if latest is not None:
            verify_checkpoint(latest)  # before a worker unpickles it
        return
    atomic_write_text(path, json.dumps(ours, indent=2, sort_keys=True) + "\n")


_CHECKPOINT_PREFIX = "checkpoint_"


def checkpoint_dir_name(step: int) -> str:
    """Name of the resume checkpoint the loop reports at `step` (in the Ray run directory)."""
    return f"{_CHECKPOINT_PREFIX}{step:08d}"


def _step_of(d: Path) -> int:
    return int(d.name.removeprefix(_CHECKPOINT_PREFIX))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest *complete* resume checkpoint in a Ray run directory, if any.

    Ray creates a checkpoint directory as the ranks' files arrive and registers it once all have;
    a run killed in between leaves one that is not complete and must not count.
    """
    dirs = [
        d
        for d in run_dir.glob(f"{_CHECKPOINT_PREFIX}*")
        if d.is_dir() and d.name.removeprefix(_CHECKPOINT_PREFIX).isdigit()
    ]
    return next((d for d in sorted(dirs, key=_step_of, reverse=True) if is_complete(d)), None)


def _record_name(rank: int) -> str:
    return f"sha256_rank{rank:05d}.json"


def _read_record(d: Path, rank: int) -> dict[str, Any]:
    path = d / _record_name(rank)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing, so nothing vouches for the files of rank {rank}, which DeepSpeed "
            "would unpickle (an incomplete checkpoint, or one written by an older gptflow); start "
            "a fresh run (another run_name)"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        files = record["files"]
        if not (isinstance(files, dict) and isinstance(record["world_size"], int)):
            raise TypeError("files must be an object, world_size an integer")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path}: unreadable checkpoint record ({type(e).__name__}: {e})"
        ) from e
    return record


def is_complete(d: Path) -> bool:
    """The loop state and every rank's record are there, with every file they list at its size."""
    try:
        world = _read_record(d, 0)["world_size"]
        if not (d / STATE_FILE).is_file():
            return False
        for rank in range(world):
            for name, entry in _read_record(d, rank)["files"].items():
                f = d / name
                if not f.is_file() or f.stat().st_size != entry["bytes"]:
                    return False
    except (CheckpointError, OSError, KeyError, TypeError):
        return False
    return True


def verify_checkpoint(d: str | Path, ranks: Any = None) -> None:
    """Check every file the given ranks (default: all) wrote into checkpoint `d` against its
    recorded sha256; CheckpointError naming the first file that is missing or differs."""
    d = Path(d)
    world = _read_record(d, 0)["world_size"]
    for rank in sorted(set(range(world) if ranks is None else ranks)):
        record = _read_record(d, rank)
        for name, entry in sorted(record["files"].items()):
            f = d / name
            if not f.is_file():
                raise CheckpointError(
                    f"{f}: missing from the checkpoint (listed in {_record_name(rank)})"
                )
            if sha256_file(f) != entry["sha256"]:
                raise CheckpointError(
                    f"{f}: sha256 differs from the one recorded when the checkpoint was written "
                    f"({_record_name(rank)}); it was changed or corrupted in storage and is not "
                    "loaded. Start a fresh run (another run_name), or restore the checkpoint"
                )


def record_files(tmp: Path, rank: int, world_size: int) -> None:
    """Hash what this rank wrote, before Ray uploads it; the record goes last, beside the files."""
    files = {
        p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    record = {"rank": rank, "world_size": world_size, "files": files}
    (tmp / _record_name(rank)).write_text(
        json.dumps(record, indent=1, sort_keys=True), encoding="utf-8"
    )


STATE_FILE = "trainer_state.json"


@dataclass
class LoopState:
    """What a resume checkpoint records beside DeepSpeed's own state (written as JSON by rank 0)."""

    step: int = 0
    """Optimizer steps completed; also the data position (batches are a function of the step)."""
    loss_ema: float | None = None
    """Running mean of good losses, for spike detection."""
    skipped_total: int = 0
    skipped_in_a_row: int = 0
    tokens_seen: int = 0
    history: list[list[float]] = field(default_factory=list)
    """[step, loss, val_loss or NaN] rows, for the loss-curve plot (survives restarts)."""


def save_checkpoint(engine: Any, state: LoopState, metrics: dict[str, Any], rank: int) -> None:
    """Every rank writes its DeepSpeed shard files into its own temp dir; Ray merges them in
    storage."""
    import ray.train
    import torch

    tag = f"step{state.step:08d}"
    with tempfile.TemporaryDirectory(prefix="gptflow-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=tag)
        torch.save(
            {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            Path(tmp) / f"rng_rank{rank:05d}.pt",
        )
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps({**state.__dict__, "tag": tag}))
        record_files(Path(tmp), rank, ray.train.get_context().get_world_size())
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint_dir_name(state.step),
        )


def load_checkpoint(engine: Any, checkpoint: Any, rank: int) -> LoopState:
    import torch

    with checkpoint.as_directory() as d:
        # This rank's files and rank 0's (loop state, model states): DeepSpeed unpickles them.
        verify_checkpoint(d, ranks={0, rank})
        saved = json.loads(Path(d, STATE_FILE).read_text())
        tag = saved.pop("tag")
        path, _ = engine.load_checkpoint(
            d, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {tag!r} in {d}")
        # The scheduler's state is only its position (last_batch_iteration); the learning rate the
        # next step uses comes from the optimizer's saved param_groups, i.e. from the schedule of
        # the run that wrote the checkpoint. Recompute it from this run's schedule at the same
        # position: identical for a same-config restart, and a run resumed into more steps (N then
        # 2N) follows the 2N schedule from its first resumed step rather than one step later.
        sched = engine.lr_scheduler
        if sched is not None and hasattr(sched, "last_batch_iteration"):
            sched.step(sched.last_batch_iteration)
        rng_file = Path(d, f"rng_rank{rank:05d}.pt")
        if rng_file.is_file():  # absent when the world size changed; batches do not depend on it
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
    return LoopState(**saved)


# ----------------------------------------------------------------------------- restarts and stops

# Ray Train's record of the run's registered checkpoints, in the run directory (ray.train.v2
# constants).
_RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def _run_file(storage_path: str, run_name: str, name: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of a file in the Ray run directory: local paths and s3://...
    alike."""
    import pyarrow.fs

    uri = storage_path if "://" in storage_path else str(Path(storage_path).resolve())
    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    return fs, f"{root.rstrip('/')}/{run_name}/{name}"


def _read_run_file(storage_path: str, run_name: str, name: str) -> str | None:
    fs, path = _run_file(storage_path, run_name, name)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8")
    except OSError:  # FileNotFoundError included
        return None


def resume_step(storage_path: str, run_name: str) -> int | None:
    """The step a fit under this run name resumes from (its latest registered checkpoint), if any.

    Read from Ray's checkpoint-manager snapshot, the record Ray itself resumes from: it lists only
    checkpoints Ray registered (once every rank reported), with the metrics reported beside them
    (the loop reports ``step``). A checkpoint directory alone is not enough: its files arrive before
    Ray registers it, and a run that loses a worker in between resumes from the one before.
    """
    text = _read_run_file(storage_path, run_name, _RAY_SNAPSHOT)
    try:
        return (
            int(json.loads(text)["latest_checkpoint_result"]["metrics"]["step"]) if text else None
        )
    except (ValueError, KeyError, TypeError):  # being rewritten, no checkpoint yet, another format
        return None


STOP_FILE = "gptflow_stopped.txt"


class TrainingStopped(RuntimeError):
    """The run stopped itself in a way every restart from its last checkpoint would repeat.

    Repeated bad updates, or a checkpoint past ``steps``: every rank gets there at the same step
    from the same state. Ray Train restarts the worker group after any worker error (up to
    ``max_failures`` times), so the stop is recorded in the run directory first
    (:func:`record_stop`); a restarted worker that finds it returns at once instead of training into
    the same stop again, and the driver raises the recorded message (:func:`take_stop`).
    """


def record_stop(storage_path: str, run_name: str, message: str) -> None:
    """Worker side: record why the run stopped (every rank that stops writes the same message)."""
    fs, path = _run_file(storage_path, run_name, STOP_FILE)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(message.encode("utf-8"))


def read_stop(storage_path: str, run_name: str) -> str | None:
    """The stop recorded by an earlier worker group of this fit, if any."""
    return _read_run_file(storage_path, run_name, STOP_FILE)


def take_stop(storage_path: str, run_name: str) -> str | None:
    """Driver side: the recorded stop, if any, removed (so the next fit under this run name
    trains)."""
    message = read_stop(storage_path, run_name)
    if message is not None:
        fs, path = _run_file(storage_path, run_name, STOP_FILE)
        fs.delete_file(path)
    return message
