"""Pipeline configuration: the whole pipeline's config, a frozen dataclass per section, loaded from
YAML.

One path only: dataclass defaults, then the YAML file, then ``--set section.key=value`` overrides.
An unknown key or a value of the wrong type raises :class:`ConfigError` naming the key and the
file. Configs validate; they never act: no file reads beyond the YAML itself, no Ray, no MLflow.

The sections live beside the stages they configure (flows/data/config.py, flows/train/config.py,
flows/evaluate/config.py, flows/registry/config.py, flows/serve/config.py, flows/ops/config.py) and
the machinery they share (checks, the loader, hashing) in flows/configlib.py; this module composes
them into :class:`PipelineConfig` and holds the two sections of the seams (tracking, cluster). Every
public name is importable from here (``from flows.config import TrainConfig``).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path

from flows.configlib import (
    ConfigError,
    build,
    check,
    flatten,
    load,
    stable_hash,
    to_dict,
)
from flows.data.config import (
    BUILTIN_CORPUS,
    BUILTIN_SFT,
    CurateConfig,
    DataConfig,
    KnowledgeSource,
    KnowledgeTemplate,
    NearDedupConfig,
    QualityConfig,
)
from flows.evaluate.config import EvaluateConfig
from flows.ops.config import ScheduleConfig
from flows.registry.config import RegistryConfig
from flows.serve.config import ServeConfig
from flows.train.config import PRECISIONS, DistillConfig, LoRAConfig, ModelConfig, TrainConfig

__all__ = [
    "BUILTIN_CORPUS",
    "BUILTIN_SFT",
    "PRECISIONS",
    "ClusterConfig",
    "ConfigError",
    "CurateConfig",
    "DataConfig",
    "DistillConfig",
    "EvaluateConfig",
    "KnowledgeSource",
    "KnowledgeTemplate",
    "LoRAConfig",
    "ModelConfig",
    "NearDedupConfig",
    "PipelineConfig",
    "QualityConfig",
    "RegistryConfig",
    "ScheduleConfig",
    "ServeConfig",
    "TrackingConfig",
    "TrainConfig",
    "build",
    "flatten",
    "load_config",
    "stable_hash",
    "to_dict",
]


# The seams' sections (flows/tracking.py, flows/cluster.py): every step's context carries them, so
# they live with the whole rather than beside one stage.
@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: where runs go. The MLFLOW_TRACKING_URI environment variable wins over `uri`."""

    enabled: bool = True
    """Turn tracking off (tests of a stage alone)."""
    uri: str | None = None
    """Tracking URI; default sqlite:///<workdir>/mlflow.db with artifacts under
    <workdir>/mlartifacts."""
    experiment: str = "gptflow"
    """MLflow experiment name."""


@dataclass(frozen=True)
class ClusterConfig:
    """The Ray cluster to use; RAY_ADDRESS in the environment wins over `address`."""

    address: str | None = None
    """Ray address to join ("auto": the latest `ray start` on this machine; "host:6379";
    "ray://host:10001"); empty starts a fresh local Ray instance, never joining another by accident.
    An address whose GCS does not answer within seconds is an error."""
    num_cpus: int | None = None
    """CPUs for a local Ray instance (default: all)."""
    allow_no_auth: bool = False
    """Accept a Ray cluster that does not require token authentication (anyone who can reach it can
    run code on it). By default gptflow checks, once connected, that the cluster refuses a request
    without the token, and stops otherwise."""

    def __post_init__(self) -> None:
        check(
            self.num_cpus is None or self.num_cpus >= 1,
            "num_cpus",
            self.num_cpus,
            ">= 1 (or empty for all)",
        )


# The pipeline's defaults (the embedded configs/local.yaml): pretrain the small preset on the
# builtin corpus, then fine-tune it on the builtin pairs, on a 2-core laptop in minutes. bf16
# autocast runs matmuls ~4x faster than fp32 on CPUs with AVX-512 BF16 (1.3x for a whole step of
# this small model, whose time goes to per-op overhead); one worker per core.
def _data_defaults() -> DataConfig:
    return DataConfig(sft_inputs=(BUILTIN_SFT,))


def _model_defaults() -> ModelConfig:
    return ModelConfig(preset="small")


def _pretrain_defaults() -> TrainConfig:
    return TrainConfig(
        steps=300,
        micro_batch_size=32,
        num_workers=2,
        precision="bf16-autocast",
        lr=3e-3,
        warmup_steps=20,
        eval_every=100,
        checkpoint_every=100,
    )


def _finetune_defaults() -> TrainConfig:
    return TrainConfig(
        steps=100,
        micro_batch_size=32,
        num_workers=2,
        precision="bf16-autocast",
        lr=1e-3,
        warmup_steps=10,
        weight_decay=0.0,
        eval_every=50,
        checkpoint_every=50,
    )


def _distill_defaults() -> DistillConfig:
    return DistillConfig(
        steps=300,
        micro_batch_size=32,
        num_workers=2,
        precision="bf16-autocast",
        lr=3e-3,
        warmup_steps=20,
        eval_every=100,
        checkpoint_every=100,
    )


def _evaluate_defaults() -> EvaluateConfig:
    # Prompts in the fine-tuning format (see flows/data/corpus.py), for functions no stdlib has.
    return EvaluateConfig(
        prompts=(
            '# textutils.count_words\ndef count_words(text, sep=None):\n    """',
            '# shapes.Circle.area\ndef area(self):\n    """',
            '# netutils.parse_headers\ndef parse_headers(lines):\n    """',
            "The ",
        )
    )


@dataclass(frozen=True)
class PipelineConfig:
    """The whole pipeline: a section per stage, plus where outputs go."""

    workdir: str = "work"
    """Root of every stage's output (<workdir>/<stage>/<hash>/); shared storage on clusters."""
    data: DataConfig = field(default_factory=_data_defaults)
    model: ModelConfig = field(default_factory=_model_defaults)
    pretrain: TrainConfig = field(default_factory=_pretrain_defaults)
    finetune: TrainConfig = field(default_factory=_finetune_defaults)
    distill: DistillConfig = field(default_factory=_distill_defaults)
    evaluate: EvaluateConfig = field(default_factory=_evaluate_defaults)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


def load_config(
    path: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> PipelineConfig:
    """Defaults, then the YAML file at `path` (if any), then `section.key=value` overrides."""
    return load(PipelineConfig, path, overrides)
