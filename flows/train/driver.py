"""Training stage, driver side: ``train(train_cfg, model_cfg, dataset, init, out_dir, ctx)`` ->
bundle, and ``distill(distill_cfg, dataset, teacher, init, out_dir, ctx)`` -> the student's bundle.

What it is: the stage: prepare (flows/train/prepare.py, every check before any worker starts), the
resume guard (flows/train/checkpoint.py), the stage's MLflow run, a Ray Train ``TorchTrainer`` over
flows/train/loop.py, and the finished bundle. Fine-tuning is not a second code path: it is this
stage with ``stage="finetune"``, an ``init`` model and the ``sft`` split, whose loss mask the loop
applies; distillation (:func:`distill`) is this stage with ``stage="distill"`` and a teacher
(flows/train/teacher.py), the student's architecture read from its own section.

Resuming.  The Ray run ``<storage_path>/<run_name>`` is the "place" of a run: a fit under a name
that already holds checkpoints resumes from the latest one (Ray Train's behaviour). The default name
is ``<stage>-<hash>``, so re-running a stopped config resumes it and nothing else. Resuming *into
more steps* ("run N steps, then 2N in the same place") takes an explicit ``run_name``: ``steps`` is
part of the output hash, so the 2N run writes its own bundle directory and the N-step bundle stays
as it was. The resumed part follows the 2N run's lr schedule from step N on (the schedule is a
function of the step and the run's total steps; the loop recomputes the lr on resume), so a schedule
that depends on the total steps (cosine decay to ``min_lr_ratio``) gives a different result than an
uninterrupted 2N run; with a schedule that does not (``min_lr_ratio=1``) the result is the same, to
the bit on CPU. Everything else that determines the weights must match the run being resumed:
:func:`check_resume` refuses a different model, data, optimizer or schedule setting under the same
name before any worker starts (local storage; an ``s3://`` storage path is not checked).

Failures.  A worker lost mid-run (killed, out of memory, its node gone) makes Ray Train restart the
whole worker group from the latest checkpoint, up to ``max_failures`` times per fit (default 3). The
batches are a function of the step, so the run ends with the weights an uninterrupted run would
have, to the bit on CPU, having repeated at most ``checkpoint_every`` steps per restart. Once the
restarts are spent, the error names ``max_failures``, the checkpoint directory and the step a re-run
of the same command resumes from. A stop the loop makes itself (repeated bad updates) is not
retried: every restart would reach it again (flows.train.checkpoint.TrainingStopped).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from flows.config import DistillConfig, ModelConfig, TrainConfig, to_dict
from flows.context import StepContext
from flows.models.base import BUNDLE_FILES
from flows.train import faults
from flows.train.checkpoint import check_resume, resume_step, take_stop
from flows.train.prepare import LoopConfig, RunSpec, check_cluster, loop_config, prepare
from flows.workdir import atomic_write_text

# The run's last checkpointed metrics, beside the bundle (not part of the bundle contract).
RESULT_FILE = "train_result.json"

log = logging.getLogger(__name__)


def train(
    tc: TrainConfig,
    mc: ModelConfig,
    dataset: str | Path,
    init: str | Path | None,
    out_dir: str | Path,
    ctx: StepContext,
    stage: str = "pretrain",
    teacher: str | Path | None = None,
) -> Path:
    """Train (or fine-tune, ``stage="finetune"`` from `init`; or distill, ``stage="distill"`` from
    `teacher`) into the model bundle `out_dir`; return it.

    The pipeline runner decided that `out_dir` must be built and writes its DONE marker afterwards.
    """
    from flows.cluster import ensure_ray

    p = prepare(tc, mc, dataset, init, out_dir, ctx, stage, teacher)
    if ctx.fresh and not tc.run_name:
        # --force: a fresh run, not a resume from the last run's final checkpoint under the same
        # name.
        shutil.rmtree(Path(p.storage_path) / p.run_name, ignore_errors=True)
    check_resume(p)
    ensure_ray(ctx.cluster)
    check_cluster(p.train, stage, local=not (os.environ.get("RAY_ADDRESS") or ctx.cluster.address))
    tracker = ctx.tracker
    _track_inputs(tracker, p, stage)
    from flows.progress import relayed

    ctx.progress.note(
        f"starting {p.train.num_workers} Ray Train worker(s): {p.train.steps} steps, "
        f"ZeRO-{p.train.zero_stage}, {p.train.precision}"
    )
    with relayed(ctx.progress, stage) as relay:
        metrics = run_trainer(
            p, dataclasses.replace(loop_config(p, tracker.run_id, tracker.uri), progress=relay)
        )
    missing = [f for f in BUNDLE_FILES if not (p.output_dir / f).is_file()]
    if missing:
        raise RuntimeError(
            f"training finished but the bundle in {p.output_dir} lacks {', '.join(missing)}"
        )
    tracker.log_metrics(
        {f"final_{k}": v for k, v in metrics.items() if isinstance(v, int | float)},
        step=p.train.steps,
    )
    tracker.log_artifacts(p.output_dir, "bundle")
    atomic_write_text(
        p.output_dir / RESULT_FILE,
        json.dumps(
            {"stage": stage, "ray_run_name": p.run_name, "metrics": metrics},
            indent=2,
            sort_keys=True,
        )
        + "\n",
    )
    log.info("%s: bundle written to %s", stage, p.output_dir)
    return p.output_dir


def _track_inputs(tracker: Any, p: RunSpec, stage: str) -> None:
    """What the stage's MLflow run records before any worker starts: the configs, the tags that
    find its checkpoints and output, the teacher's lineage and the dataset."""
    tracker.log_params(
        {
            "train": to_dict(p.train),
            "model": p.gpt_config,
            "output_dir": str(p.output_dir),
            "dataset_manifest_sha256": p.dataset.manifest_sha256,
        }
    )
    tracker.set_tags(
        {
            "gptflow.ray_run_name": p.run_name,
            "gptflow.storage_path": p.storage_path,
            "gptflow.output_dir": str(p.output_dir),
            "gptflow.config_hash": p.key,
        }
    )
    tracker.log_dict(p.deepspeed_config, "deepspeed_config.json")
    tracker.log_dict(
        {
            "stage": stage,
            "train": to_dict(p.train),
            "model": p.gpt_config,
            "parent": p.parent,
            "teacher": p.teacher,
        },
        "train_config.json",
    )
    if p.teacher:
        tracker.set_tags(
            {
                "gptflow.teacher": json.dumps(p.teacher["lineage"], sort_keys=True),
                "gptflow.teacher_bundle": p.teacher["bundle"],
            }
        )
    tracker.log_input_dataset(
        Path(p.dataset.path).name,
        p.dataset.path,
        p.dataset.manifest_sha256,
        context="training",
        profile=p.dataset.split_tokens,
    )


def distill(
    dc: DistillConfig,
    dataset: str | Path,
    teacher: str | Path,
    init: str | Path | None,
    out_dir: str | Path,
    ctx: StepContext,
) -> Path:
    """Distill `teacher` into a student described by `dc` (its preset, context and dropout; or
    `init`) into the model bundle `out_dir`; return it."""
    return train(dc, dc.student_model(), dataset, init, out_dir, ctx, "distill", teacher)


def run_trainer(p: RunSpec, loop_cfg: LoopConfig) -> dict[str, Any]:
    """Run the TorchTrainer; returns the last checkpointed report's metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from flows.train.loop import train_loop_per_worker

    tc = p.train
    resources = {"CPU": tc.cpus_per_worker} | ({"GPU": 1} if tc.use_gpu else {})
    env = {"OMP_NUM_THREADS": str(tc.cpus_per_worker), "TOKENIZERS_PARALLELISM": "false"}
    if not tc.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # no probing for CUDA/XPU on CPU workers
    env |= (
        faults.worker_env()
    )  # test-only fault injection, when the driver's environment asks for it
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=p.run_name,
            storage_path=p.storage_path,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),
    )
    take_stop(
        p.storage_path, p.run_name
    )  # a stop recorded by an earlier fit of this run name is stale
    try:
        result = trainer.fit()
    except Exception as e:
        stopped = take_stop(p.storage_path, p.run_name)
        raise RuntimeError(stopped or failure_message(p, e)) from e
    stopped = take_stop(p.storage_path, p.run_name)
    if stopped:  # the workers stopped the run themselves and a restarted group found the record
        raise RuntimeError(stopped)
    return dict(result.metrics or {})


def failure_message(p: RunSpec, error: BaseException) -> str:
    """What a failed fit tells the user: why it gave up, where its checkpoints are, how to
    resume."""
    from ray.train import WorkerGroupError

    tc, where = p.train, f"{p.storage_path}/{p.run_name}"
    if not isinstance(
        error, WorkerGroupError
    ):  # e.g. the cluster cannot place the workers: not retried
        what = "failed"
    elif tc.max_failures:
        what = (
            f"failed and its restarts are exhausted: {tc.max_failures} worker-group restart(s) "
            f"from the latest checkpoint, max_failures={tc.max_failures}"
        )
    else:
        what = "failed on its first worker error: restarts are off (max_failures=0)"
    step = resume_step(p.storage_path, p.run_name)
    if step is not None:
        resume = f"re-run the same command (without --force) to resume from step {step}"
    else:
        resume = (
            "it has no resume checkpoint yet (the first comes at step "
            f"{min(tc.checkpoint_every, tc.steps)}), so re-running the same command starts it "
            "again from step 0"
        )
    return (
        f"{p.stage} run {p.run_name!r} {what}. Its resume checkpoints are under {where}: {resume}; "
        f"{p.stage}.max_failures sets how many lost workers one run survives. "
        f"The error: {type(error).__name__}: {error}"
    )
