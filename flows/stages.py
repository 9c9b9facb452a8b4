"""How each pipeline step calls its stage: the stage function receives its own config sections, its
inputs and its output directory (and the step's context), never the whole config.

These are the ``run`` (and ``fingerprint``) callables of the steps in flows/pipeline.py's ``STEPS``;
each imports its stage when it runs, so planning an unchanged pipeline loads no stage, Ray or torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flows.config import PipelineConfig, RegistryConfig
from flows.context import StepContext

Inputs = Mapping[str, Any]


def import_base(cfg: PipelineConfig, inputs: Inputs, out: Path, ctx: StepContext) -> Path:
    from flows.models import base

    return base.build(cfg.model.base, out, ctx)


def base_identity(cfg: PipelineConfig, ctx: StepContext) -> Any:
    from flows.models import base

    return base.identity(cfg.model.base, ctx)


def preprocess(cfg: PipelineConfig, inputs: Inputs, out: Path, ctx: StepContext) -> Path:
    from flows.data import stage

    base = inputs.get("base")
    model = stage.BaseModel.of(Path(base), cfg.model.context_length) if base else None
    return stage.preprocess(cfg.data, out, ctx, model)


def data_fingerprint(cfg: PipelineConfig, ctx: StepContext) -> Any:
    from flows.data import stage

    # With a base model the context caps the fine-tuning examples (longer ones are dropped,
    # counted).
    return stage.fingerprint(cfg.data, ctx) | (
        {"context_length": cfg.model.context_length} if cfg.model.base else {}
    )


def trainer(stage: str) -> Callable[[PipelineConfig, Inputs, Path, StepContext], Path]:
    """The pretrain or finetune step: `stage` names its section."""

    def run(cfg: PipelineConfig, inputs: Inputs, out: Path, ctx: StepContext) -> Path:
        from flows.train import driver

        return driver.train(
            getattr(cfg, stage), cfg.model, inputs["dataset"], inputs["init"], out, ctx, stage
        )

    return run


def evaluate(cfg: PipelineConfig, inputs: Inputs, out: Path, ctx: StepContext) -> Path:
    from flows.evaluate import stage

    base = inputs.get("base")
    return stage.evaluate(
        cfg.evaluate,
        Path(inputs["bundle"]),
        Path(inputs["dataset"]),
        out,
        ctx.tracker,
        ctx.progress,
        base=Path(base) if base else None,
    )


def register(cfg: PipelineConfig, inputs: Inputs, out: Path, ctx: StepContext) -> Path:
    from flows.registry import register

    return register.register(
        cfg.registry,
        Path(inputs["bundle"]),
        Path(inputs["evaluation"]),
        Path(inputs["dataset"]),
        out,
        ctx,
    )


def promote(cfg: PipelineConfig, inputs: Inputs, out: Path, ctx: StepContext) -> Path:
    from flows.registry import promote

    return promote.promote(cfg.registry, cfg.evaluate, Path(inputs["registered"]), out, ctx)


def distill(cfg: PipelineConfig, inputs: Inputs, out: Path, ctx: StepContext) -> Path:
    from flows.train import driver

    return driver.distill(
        cfg.distill, inputs["dataset"], inputs["teacher"], inputs["init"], out, ctx
    )


def student_registry(cfg: PipelineConfig) -> RegistryConfig:
    """The registry section the student is registered and promoted under: its own model name."""
    return dataclasses.replace(
        cfg.registry, name=cfg.distill.registry_name or f"{cfg.registry.name}-student"
    )


def register_student(cfg: PipelineConfig, inputs: Inputs, out: Path, ctx: StepContext) -> Path:
    from flows.registry import register

    return register.register(
        student_registry(cfg),
        Path(inputs["bundle"]),
        Path(inputs["evaluation"]),
        Path(inputs["dataset"]),
        out,
        ctx,
        stage_steps=("distill", "distill_evaluate"),
        teacher_model=cfg.registry.name,
    )


def promote_student(cfg: PipelineConfig, inputs: Inputs, out: Path, ctx: StepContext) -> Path:
    from flows.registry import promote

    return promote.promote(
        student_registry(cfg), cfg.evaluate, Path(inputs["registered"]), out, ctx
    )


def serve(cfg: PipelineConfig, inputs: Inputs, out: Path, ctx: StepContext) -> Path:
    from flows.serve import deploy

    return deploy.deploy_step(cfg.serve, cfg.registry, out, ctx)
