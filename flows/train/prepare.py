"""Preparing a training run, driver side: everything decided before any worker starts.

What it is: :func:`prepare` checks the config and the data before any
worker starts (missing or corrupt shards, tokenizer/model vocabulary mismatch, a context the data
cannot fill, a GPU that is not there, ...), resolves the initial model, generates the DeepSpeed
config from the typed :class:`~flows.config.TrainConfig` and the typed, frozen :class:`LoopConfig`
every worker receives. The stage itself (MLflow, the TorchTrainer) is flows/train/driver.py.

What it is not: the loop itself (flows/train/loop.py) or the data reader (flows/data/dataset.py).
Fine-tuning is not a second code path: it is this stage with ``stage="finetune"``, an ``init`` model
and the ``sft`` split, whose loss mask the loop applies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.config import ConfigError, ModelConfig, TrainConfig, to_dict
from flows.context import StepContext
from flows.data.dataset import DataError, DatasetInfo, check_dataset
from flows.object_storage import require_driver
from flows.train.ds_config import deepspeed_config
from flows.workdir import sha256_file

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune", "distill")


@dataclass(frozen=True)
class RunSpec:
    """A training run as the workers will run it: everything the driver decided before starting
    them (all JSON-serialisable). Handed whole to every worker inside its LoopConfig."""

    stage: str
    """pretrain, finetune or distill."""
    train: TrainConfig
    """The stage's section as the user wrote it (a DistillConfig for distillation)."""
    gpt_config: dict[str, Any]
    """The model to build (GPTConfig.to_dict()): the preset or init model, the data's vocabulary."""
    context_length: int
    """Training windows: the model's context, or less (model.context_length, capped by the init
    model's)."""
    dataset: DatasetInfo
    split: str
    """The split trained on: train, sft, or distillation's choice."""
    eval_split: str | None
    """The split validated on during training; None when the dataset has none that feeds every
    worker."""
    init_bundle: str | None
    """The initial model's local bundle directory; None from scratch."""
    parent: dict[str, Any] | None
    """The initial model's lineage, recorded in the bundle's metadata."""
    key: str
    """The output directory's name: the runner's hash of everything that determines the weights."""
    output_dir: Path
    run_name: str
    """The Ray Train run (under storage_path) that holds the resume checkpoints."""
    storage_path: str
    deepspeed_config: dict[str, Any]
    teacher: dict[str, Any] | None = None
    """Distillation only: the teacher's bundle, lineage, alpha and temperature."""


def _feeds(manifest: dict[str, Any], split: str, T: int, world: int) -> bool:
    """Whether to validate on `split` during training. A val split made of the held-out facts of
    knowledge sources alone (see flows/data/knowledge.py) may be too small to give every rank a
    window: it is then left to the evaluate stage, which scores it whole. Any other split too small
    is the dataset check's error."""
    shards = (manifest["splits"].get(split) or {}).get("shards") or []
    if not shards:
        return False
    knowledge_only = split == "val" and manifest.get("val_assignment", {}).get("mode") == "fixed"
    if not knowledge_only or sum((s["tokens"] - 1) // T for s in shards) >= world:
        return True
    log.warning(
        "split %r is too small for a validation window per worker (%d tokens, context %d, %d "
        "workers): no validation on it during training",
        split,
        sum(s["tokens"] for s in shards),
        T,
        world,
    )
    return False


def resolve_init(
    init: str, ctx: StepContext, stage: str, key: str = "init"
) -> tuple[Path, dict[str, Any]]:
    """A local bundle directory for `init` and its lineage: a bundle directory as it is; any other
    model source (models:/NAME@ALIAS, a Hugging Face directory, a .gguf file, builtin:NAME) through
    the one import (flows/models/base.py), into the workdir's content-addressed ``import/<hash>/``.

    `key`: the config key that named it (``init``, or ``teacher`` for distillation), for error
    messages.
    """
    from flows.models.base import ensure, find_bundle, is_bundle

    path = Path(init)
    # A bundle directory, or a folder holding one (a downloaded MLflow model) that is no HF
    # directory.
    found = (
        find_bundle(path)
        if path.is_dir() and not (path / "config.json").is_file() or is_bundle(path)
        else None
    )
    if found is not None:
        return found, {
            "bundle": str(found.resolve()),
            "model_sha256": sha256_file(found / "model.safetensors"),
        }
    if not init.startswith(("models:/", "builtin:")) and not path.exists():
        raise ConfigError(
            f"{stage}.{key}={init!r}: no such directory or file (and not a models:/NAME@ALIAS, "
            "models:/NAME/VERSION URI or builtin:NAME)"
        )
    try:
        bundle = ensure(init, ctx)
    except ValueError as e:  # ConfigError, RegistryError, a reader's error naming the file
        raise ConfigError(f"{stage}.{key}={init!r}: {e}") from e
    sha = sha256_file(bundle / "model.safetensors")
    if init.startswith("models:/"):
        return bundle, {"uri": init, "model_sha256": sha}
    source = str(path.resolve()) if path.exists() else init  # a file or directory: where it is
    return bundle, {"source": source, "bundle": str(bundle), "model_sha256": sha}


def prepare(
    tc: TrainConfig,
    mc: ModelConfig,
    dataset: str | Path,
    init: str | Path | None,
    out_dir: str | Path,
    ctx: StepContext,
    stage: str = "pretrain",
    teacher: str | Path | None = None,
) -> RunSpec:
    """Check config, initial model and data; decide the model, DeepSpeed config and resume place.

    Distillation (``stage="distill"``, `tc` a DistillConfig) also resolves and checks the `teacher`;
    the student's architecture comes from `tc` (its preset, or `init`), `mc` is not read.
    Raises ConfigError / DataError before any worker starts. Reads files; starts nothing.
    """
    _check_request(tc, dataset, init, stage)
    teacher_info = None
    if stage == "distill":
        teacher_info, mc = _distill_student(tc, init, teacher, ctx)
    init_bundle, parent = resolve_init(str(init), ctx, stage) if init else (None, None)
    gpt, T, model_tok = _initial_model(mc, init_bundle, stage)
    split = {"pretrain": "train", "finetune": "sft"}.get(stage) or tc.split  # type: ignore[attr-defined]
    info, eval_split, data_tok = _check_data(Path(dataset), split, T, tc.num_workers)
    gpt = _match_data(gpt, mc, T, data_tok, Path(dataset), init_bundle, model_tok)
    if teacher_info is not None:
        _check_teacher(teacher_info, data_tok, Path(dataset) / "tokenizer.json", Path(dataset), T)

    from flows.train.capacity import preflight

    ds_config = deepspeed_config(tc, gpt.num_params())
    local = not (os.environ.get("RAY_ADDRESS") or getattr(ctx.cluster, "address", None))
    preflight(
        tc,
        windowed(gpt, T),
        stage,
        local=local,
        teacher=teacher_info["gpt"] if teacher_info else None,
    )
    out = Path(out_dir).resolve()
    key = out.name  # the runner named the output after everything that determines the weights
    storage = tc.storage_path or str((Path(ctx.workdir) / "ray_results").resolve())
    require_driver(
        storage, f"{stage}.storage_path={storage!r}"
    )  # s3://: the resume guard reads it with fsspec
    return RunSpec(
        stage=stage,
        train=tc,
        gpt_config=gpt.to_dict(),
        context_length=T,
        dataset=info,
        split=split,
        eval_split=eval_split,
        init_bundle=str(init_bundle.resolve()) if init_bundle else None,
        parent=parent,
        key=key,
        output_dir=out,
        run_name=tc.run_name or f"{stage}-{key}",
        storage_path=storage,
        deepspeed_config=ds_config,
        teacher=None
        if teacher_info is None
        else {
            "bundle": str(teacher_info["bundle"].resolve()),
            "lineage": teacher_info["lineage"],
            "alpha": tc.alpha,
            "temperature": tc.temperature,  # type: ignore[attr-defined]
        },
    )


def windowed(gpt: Any, T: int) -> Any:
    """The model as trained on windows of T tokens: RoPE models cost (and hold) what T needs;
    learned positions keep their table whole."""
    return dataclasses.replace(gpt, context_length=T) if gpt.positions != "learned" else gpt


def _check_request(
    tc: TrainConfig, dataset: str | Path, init: str | Path | None, stage: str
) -> None:
    """What the config alone must satisfy, before any file is read."""
    if stage not in STAGES:
        raise ConfigError(f"stage={stage!r} is invalid: must be one of {', '.join(STAGES)}")
    if not dataset:
        raise ConfigError(
            f"{stage}.data is empty: give the dataset directory (--data DIR or --set "
            f"{stage}.data=DIR)"
        )
    if stage == "finetune" and not init:
        raise ConfigError(
            "finetune.init is empty: fine-tuning starts from a model (--init BUNDLE_DIR, "
            "models:/NAME@ALIAS, builtin:NAME, a .gguf file or a Hugging Face directory)"
        )
    if tc.steps == 0:
        raise ConfigError(
            f"{stage}.steps=0: nothing to train (pretrain.steps: 0 skips pretraining in the "
            "pipeline only with a model.base, whose fine-tuning then starts from the base itself)"
        )
    if tc.lora.r and not init:
        raise ConfigError(
            f"{stage}.lora.r={tc.lora.r}: LoRA adapts a pretrained model; give {stage}.init "
            "(or model.base), or set lora.r: 0"
        )
    if tc.precision == "fp16" and not tc.use_gpu:
        raise ConfigError(
            f"{stage}.precision='fp16' needs GPUs (use_gpu: true); on CPU use bf16 or fp32"
        )
    if tc.offload_optimizer and tc.zero_stage == 0:
        raise ConfigError(f"{stage}.offload_optimizer=true needs zero_stage 1, 2 or 3 (got 0)")
    deepspeed_config(tc)  # its checks, before any file is read


def _distill_student(
    tc: TrainConfig, init: str | Path | None, teacher: str | Path | None, ctx: StepContext
) -> tuple[dict[str, Any], ModelConfig]:
    """Distillation: the teacher (resolved and loaded) and the student's model section, whose
    context defaults to the teacher's."""
    if not teacher:
        raise ConfigError(
            "distill.teacher is empty: distillation learns from a model (--teacher BUNDLE_DIR, "
            "models:/NAME@ALIAS, builtin:NAME, a .gguf file or a Hugging Face directory)"
        )
    teacher_info = _resolve_teacher(str(teacher), ctx)
    student = tc.student_model()  # type: ignore[attr-defined]
    T_teacher = teacher_info["gpt"].context_length
    if student.context_length is not None and student.context_length > T_teacher:
        raise ConfigError(
            f"distill.context_length={student.context_length} exceeds the teacher's context "
            f"({T_teacher}, {teacher_info['bundle'] / 'config.json'}): the teacher must see "
            "every window the student trains on"
        )
    return teacher_info, dataclasses.replace(
        student, context_length=student.context_length or (None if init else T_teacher)
    )


def _initial_model(mc: ModelConfig, init_bundle: Path | None, stage: str) -> tuple[Any, int, Any]:
    """The architecture to train, the window length T, and the init model's tokenizer (None from
    scratch)."""
    from gptcore import GPTConfig, Tokenizer, preset

    if init_bundle is None:
        try:
            gpt = preset(mc.preset)
        except ValueError as e:
            raise ConfigError(
                f"{'distill.student_preset' if stage == 'distill' else 'model.preset'}: {e}"
            ) from None
        return gpt, mc.context_length or gpt.context_length, None
    gpt = GPTConfig.from_dict(json.loads((init_bundle / "config.json").read_text(encoding="utf-8")))
    # The training windows: the pipeline's context, capped by the model's (which the bundle keeps).
    T = min(mc.context_length or gpt.context_length, gpt.context_length)
    if mc.context_length and mc.context_length > gpt.context_length:
        log.warning(
            "model.context_length=%d is capped at the init model's %d (%s)",
            mc.context_length,
            gpt.context_length,
            init_bundle / "config.json",
        )
    gpt = dataclasses.replace(
        gpt, dropout=mc.dropout, activation_checkpointing=mc.activation_checkpointing
    )
    return gpt, T, Tokenizer.load(init_bundle / "tokenizer.json")


def _check_data(
    data_root: Path, split: str, T: int, world: int
) -> tuple[DatasetInfo, str | None, Any]:
    """The dataset checked for `split` and the validation split (if any), and its tokenizer."""
    from flows.data.dataset import read_manifest
    from gptcore import Tokenizer

    manifest = read_manifest(data_root)
    # Validation during training: held-out fine-tuning examples when fine-tuning (masked like sft),
    # else the pretraining text's val split; none when the dataset has neither.
    candidates = ("sft_val", "val") if split == "sft" else ("val",)
    eval_split = next((s for s in candidates if _feeds(manifest, s, T, world)), None)
    info = check_dataset(data_root, (split, eval_split) if eval_split else (split,), T, world=world)
    data_tok_path = data_root / "tokenizer.json"
    data_tok = Tokenizer.load(data_tok_path)
    if data_tok.vocab_size != info.vocab_size:
        raise DataError(
            f"{data_tok_path}: {data_tok.vocab_size} tokens, but {data_root / 'manifest.json'} "
            f"says vocab_size={info.vocab_size}"
        )
    return info, eval_split, data_tok


def _match_data(
    gpt: Any,
    mc: ModelConfig,
    T: int,
    data_tok: Any,
    data_root: Path,
    init_bundle: Path | None,
    model_tok: Any,
) -> Any:
    """An init model must share the data's tokenizer; a fresh model takes the data's vocabulary and
    T."""
    data_tok_path = data_root / "tokenizer.json"
    if model_tok is None:
        return dataclasses.replace(
            gpt,
            vocab_size=data_tok.vocab_size,
            context_length=T,
            dropout=mc.dropout,
            activation_checkpointing=mc.activation_checkpointing,
        )
    if model_tok.sha256() != data_tok.sha256():
        raise DataError(
            f"tokenizer mismatch: the data in {data_root} was tokenized with {data_tok_path} "
            f"({data_tok.vocab_size} tokens) but the init model uses "
            f"{init_bundle / 'tokenizer.json'} ({model_tok.vocab_size} tokens); preprocess with "
            f"data.tokenizer_path={init_bundle}"
        )
    if gpt.vocab_size != data_tok.vocab_size:
        raise DataError(
            f"{init_bundle / 'config.json'}: vocab_size={gpt.vocab_size} does not match the data's "
            f"tokenizer ({data_tok.vocab_size} tokens, {data_tok_path})"
        )
    return gpt


def _resolve_teacher(teacher: str, ctx: StepContext) -> dict[str, Any]:
    """The teacher's local bundle, lineage, architecture and tokenizer."""
    from gptcore import GPTConfig, Tokenizer

    bundle, lineage = resolve_init(teacher, ctx, "distill", key="teacher")
    gpt = GPTConfig.from_dict(json.loads((bundle / "config.json").read_text(encoding="utf-8")))
    return {
        "bundle": bundle,
        "lineage": lineage,
        "gpt": gpt,
        "tokenizer": Tokenizer.load(bundle / "tokenizer.json"),
    }


def _check_teacher(
    teacher: dict[str, Any], data_tok: Any, data_tok_path: Path, data_root: Path, T: int
) -> None:
    """Teacher, student and data share one tokenizer, and the teacher sees every window of T
    tokens."""
    bundle = teacher["bundle"]
    if teacher["tokenizer"].sha256() != data_tok.sha256():
        raise DataError(
            f"tokenizer mismatch: the teacher uses {bundle / 'tokenizer.json'} "
            f"({teacher['tokenizer'].vocab_size} tokens) but the data in {data_root} was tokenized "
            f"with {data_tok_path} ({data_tok.vocab_size} tokens); teacher and student must share "
            "a tokenizer (the student learns the teacher's distribution over its vocabulary): "
            f"preprocess with data.tokenizer_path={bundle}"
        )
    if teacher["gpt"].vocab_size != data_tok.vocab_size:
        raise DataError(
            f"{bundle / 'config.json'}: the teacher's vocab_size={teacher['gpt'].vocab_size} does "
            f"not match its tokenizer and the data's ({data_tok.vocab_size} tokens, "
            f"{data_tok_path})"
        )
    if T > teacher["gpt"].context_length:
        raise ConfigError(
            f"the student's context ({T} tokens) exceeds the teacher's "
            f"({teacher['gpt'].context_length}, {bundle / 'config.json'}); set "
            f"distill.context_length <= {teacher['gpt'].context_length}"
        )


def check_cluster(tc: TrainConfig, stage: str, local: bool) -> None:
    """The Ray cluster can place the workers (GPUs exist; on a local instance, enough CPUs)."""
    import ray

    res = ray.cluster_resources()
    if tc.use_gpu and res.get("GPU", 0) < tc.num_workers:
        raise ConfigError(
            f"{stage}.use_gpu=true with num_workers={tc.num_workers}, but the Ray cluster has "
            f"{int(res.get('GPU', 0))} GPUs; set use_gpu: false or use a GPU cluster"
        )
    need = tc.num_workers * tc.cpus_per_worker
    if local and res.get("CPU", 0) < need:
        # A local instance never grows; Ray Train would wait forever for the missing CPUs.
        raise ConfigError(
            f"{stage}: num_workers * cpus_per_worker = {need} CPUs, but the local Ray instance "
            f"has {int(res.get('CPU', 0))}; lower num_workers or cpus_per_worker"
        )


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@dataclass(frozen=True)
class LoopConfig:
    """What each training worker receives: the run spec whole, plus what the driver adds to it for
    the workers. Typed, frozen, picklable (Ray sends it to every worker); nothing read from the
    environment but the test-only fault injection (flows/train/faults.py)."""

    spec: RunSpec
    flops_per_token: float
    """Training FLOPs per token of the model on its windows (for MFU)."""
    run_id: str | None
    """The stage's MLflow run, which rank 0 logs into (None: tracking off)."""
    tracking_uri: str | None
    bundle_metadata: dict[str, Any]
    """What the exported bundle's metadata.json says beside the loop's own figures (lineage)."""
    progress: Any = None
    """The driver's progress relay (a Ray actor handle, flows/progress.py); rank 0 sends its step to
    it."""


def loop_config(p: RunSpec, run_id: str | None, uri: str | None) -> LoopConfig:
    """The worker's config for a run spec and the stage's MLflow run."""
    from gptcore import GPTConfig

    flops = windowed(GPTConfig.from_dict(p.gpt_config), p.context_length).flops_per_token()
    return LoopConfig(
        spec=p,
        flops_per_token=flops,
        run_id=run_id,
        tracking_uri=uri,
        bundle_metadata=_bundle_metadata(p),
    )


def _bundle_metadata(p: RunSpec) -> dict[str, Any]:
    """The bundle's lineage: stage, config hash, code, data, parent (and teacher), and the
    configs."""
    return {
        "stage": p.stage,
        "config_hash": p.key,
        "git_commit": _git_commit(),
        "dataset": p.dataset.path,
        "dataset_manifest_sha256": p.dataset.manifest_sha256,
        "tokenizer_sha256": p.dataset.tokenizer_sha256,
        "parent": p.parent,
        "train_config": to_dict(p.train),
        "deepspeed_config": p.deepspeed_config,
        **(
            {
                "teacher": p.teacher["lineage"],
                "distillation": {
                    "alpha": p.teacher["alpha"],
                    "temperature": p.teacher["temperature"],
                },
            }
            if p.teacher
            else {}
        ),
    }
