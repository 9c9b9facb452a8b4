"""Resume checkpoints, both sides: the driver's resume guard and the workers' save and load.

What it is: the Ray run ``<storage_path>/<run_name>`` is the "place" of a run; a fit under a name
that already holds checkpoints resumes from the latest one (Ray Train's behaviour).
:func:`check_resume` (driver) refuses to resume a run with a config it was not trained with, or into
fewer steps than its newest checkpoint. :func:`save_checkpoint` / :func:`load_checkpoint` (every
worker) write and read DeepSpeed's per-rank state, the loop state and RNG states through
``ray.train.report(checkpoint=...)``.

What it is not: the exported model bundle (what everything else loads; flows/train/loop.py writes it).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.config import ConfigError, flatten, to_dict

if TYPE_CHECKING:
    from flows.train.plan import Plan

log = logging.getLogger(__name__)

RESUME_FILE = "gptflow_resume.json"


# TrainConfig fields a resumed run may change: they do not enter the weights (what is logged, kept
# or retried, where it runs) -- plus `steps`, which is what resuming into more steps changes.
_RESUMABLE_CHANGES = ("steps", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                      "max_failures", "max_skipped_updates", "peak_flops_per_device", "sample_prompts",
                      "sample_tokens", "fail_at_step", "cpus_per_worker", "global_batch_size")


def resume_identity(p: Plan) -> dict[str, Any]:
    """What a run's checkpoints depend on, beside its step count: must match to resume under its name."""
    train = {k: v for k, v in to_dict(p.train).items()
             if k not in _RESUMABLE_CHANGES and k not in ("data", "init", "run_name", "storage_path")}
    return {"stage": p.stage, "train": train, "model": p.gpt_config,
            "dataset_manifest_sha256": p.dataset.manifest_sha256, "parent": p.parent}


def check_resume(p: Plan) -> None:
    """Refuse to resume the run ``<storage_path>/<run_name>`` with a config it was not trained with.

    Ray resumes any run under a re-used name; without this check a changed lr, model or dataset would
    silently continue from weights trained otherwise, under an output hash that does not say so.
    Records the identity for the next call. Local storage only (no check for s3://... paths).
    """
    if "://" in p.storage_path:
        return
    path = Path(p.storage_path) / p.run_name / RESUME_FILE
    ours = json.loads(json.dumps(resume_identity(p)))
    if path.is_file():
        theirs = json.loads(path.read_text(encoding="utf-8"))
        if theirs != ours:
            a, b = flatten(ours), flatten(theirs)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ConfigError(
                f"{p.stage}.run_name={p.run_name!r}: {path.parent} holds a run trained with a different "
                f"{', '.join(diff)}; resuming it would continue from those weights. Use another run_name "
                f"(only {', '.join(_RESUMABLE_CHANGES)} may change when resuming)"
            )
        reached = _latest_checkpoint_step(path.parent)
        if reached is not None and reached > p.train.steps:
            # Caught here, before any worker starts; the training loop refuses it too (remote storage).
            raise ConfigError(
                f"{p.stage}.steps={p.train.steps}: run {p.run_name!r} in {path.parent} has a checkpoint at "
                f"step {reached}; a run resumes into the same or more steps, never fewer. Use steps >= "
                f"{reached} or another run_name"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ours, indent=2, sort_keys=True) + "\n", encoding="utf-8")

_CHECKPOINT_PREFIX = "checkpoint_"


def checkpoint_dir_name(step: int) -> str:
    """Name of the resume checkpoint the loop reports at `step` (in the Ray run directory)."""
    return f"{_CHECKPOINT_PREFIX}{step:08d}"


def _latest_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the newest resume checkpoint in a Ray run directory, if any."""
    steps = [int(d.name.removeprefix(_CHECKPOINT_PREFIX)) for d in run_dir.glob(f"{_CHECKPOINT_PREFIX}*")
             if d.is_dir() and d.name.removeprefix(_CHECKPOINT_PREFIX).isdigit()]
    return max(steps, default=None)

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
    """Every rank writes its DeepSpeed shard files into its own temp dir; Ray merges them in storage."""
    import ray.train
    import torch

    tag = f"step{state.step:08d}"
    with tempfile.TemporaryDirectory(prefix="gptflow-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=tag)
        torch.save(
            {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            Path(tmp) / f"rng_rank{rank:05d}.pt",
        )
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps({**state.__dict__, "tag": tag}))
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint_dir_name(state.step),
        )


def load_checkpoint(engine: Any, checkpoint: Any, rank: int) -> LoopState:
    import torch

    with checkpoint.as_directory() as d:
        saved = json.loads(Path(d, STATE_FILE).read_text())
        tag = saved.pop("tag")
        path, _ = engine.load_checkpoint(d, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {tag!r} in {d}")
        # The scheduler's state is only its position (last_batch_iteration); the learning rate the
        # next step uses comes from the optimizer's saved param_groups, i.e. from the schedule of the
        # run that wrote the checkpoint. Recompute it from this run's schedule at the same position:
        # identical for a same-config restart, and a run resumed into more steps (N then 2N) follows
        # the 2N schedule from its first resumed step rather than one step later.
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
