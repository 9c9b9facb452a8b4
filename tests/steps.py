"""Run one pipeline step the way `gptflow preprocess|pretrain|finetune` does: through the runner
(output path, skip-if-done, DONE), raising the stage's own error so tests can match it."""

from __future__ import annotations

from pathlib import Path

from flows import pipeline
from flows.config import PipelineConfig
from flows.train.prepare import RunSpec
from flows.train.prepare import prepare as prepare_training


def run_step(cfg: PipelineConfig, name: str) -> Path:
    try:
        planned = pipeline.run(cfg, only=[name])
    except pipeline.PipelineError as e:
        raise (e.__cause__ or e) from None
    out = pipeline.step_output(planned, name)
    assert out is not None
    return out


def preprocess(cfg: PipelineConfig) -> Path:
    return run_step(cfg, "preprocess")


def train(cfg: PipelineConfig, stage: str = "pretrain") -> Path:
    return run_step(cfg, stage)


def prepare(cfg: PipelineConfig, stage: str = "pretrain") -> RunSpec:
    """The training run's spec (flows/train/prepare.py) for the output directory the runner would
    give it."""
    planned = (
        {p.step.name: p for p in pipeline.plan(cfg, wanted=[stage])}
        if stage in ("pretrain", "finetune")
        else {}
    )
    if (
        stage not in planned
    ):  # an unknown stage, or finetune disabled: let the stage's own check speak
        return prepare_training(
            getattr(cfg, stage, cfg.pretrain),
            cfg.model,
            "",
            None,
            Path(cfg.workdir) / stage,
            pipeline.context(cfg),
            stage,
        )
    p = planned[stage]
    return prepare_training(
        getattr(cfg, stage),
        cfg.model,
        p.inputs["dataset"],
        p.inputs["init"],
        p.out,
        pipeline.context(cfg),
        stage,
    )
