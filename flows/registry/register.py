"""The register step: a model bundle becomes a version of a registered MLflow model, with its
lineage.

The bundle is logged as a pyfunc model (flows/registry/pyfunc_model.py, logged as code: nothing is
pickled on the load path) whose ``bundle`` artifact holds the bundle files, with a signature,
an input example and pinned pip requirements; gptcore's source travels with it (``code_paths``),
so ``mlflow.pyfunc.load_model`` needs only those requirements. The version's tags carry the
lineage: bundle and dataset identities, tokenizer, config hash, git commit, the pipeline's, the
training's and the evaluation's run ids, the parent model and the evaluation figures.

Registering the same bundle again (same model.safetensors) returns the existing version.
"""

from __future__ import annotations

import json
import logging
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from flows.config import RegistryConfig
from flows.context import StepContext
from flows.tracking import Registry, RegistryError
from flows.workdir import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

RESULT = "registered.json"
# What the pyfunc model imports at load time; pinned to what this process runs.
_REQUIREMENTS = ("mlflow", "torch", "tokenizers", "safetensors", "numpy", "pandas")


def check_bundle(bundle: Path) -> dict[str, Any]:
    """The bundle's metadata, once its files exist and its tokenizer matches its config."""
    from gptcore import GPTConfig, Tokenizer
    from gptcore.bundle import FILES

    missing = [f for f in FILES if not (bundle / f).is_file()]
    if missing:
        raise RegistryError(f"{bundle}: not a model bundle, missing {', '.join(missing)}")
    try:
        config = GPTConfig.from_dict(
            json.loads((bundle / "config.json").read_text(encoding="utf-8"))
        )
        tok = Tokenizer.load(bundle / "tokenizer.json")
        meta = json.loads((bundle / "metadata.json").read_text(encoding="utf-8"))
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise RegistryError(f"{bundle}: unreadable bundle ({e})") from e
    if tok.vocab_size != config.vocab_size:
        raise RegistryError(
            f"{bundle}: tokenizer.json has {tok.vocab_size} tokens but config.json says "
            f"vocab_size={config.vocab_size}; the weights and tokenizer do not belong together"
        )
    return meta if isinstance(meta, dict) else {}


def pip_requirements() -> list[str]:
    out = []
    for dist in _REQUIREMENTS:
        version = importlib_metadata.version(dist).split("+")[0]  # torch 2.13.0+cpu -> 2.13.0
        out.append(f"{dist}=={version}")
    return out


def register(
    cfg: RegistryConfig,
    bundle: Path,
    evaluation: Path,
    dataset: Path,
    out_dir: Path,
    ctx: StepContext,
    stage_steps: tuple[str, str] | None = None,
    teacher_model: str | None = None,
) -> Path:
    """Register `bundle` (evaluated in `evaluation` on `dataset`) as a version of ``cfg.name``.

    `stage_steps`: the pipeline steps that trained and evaluated it, when not the bundle's stage and
    ``evaluate`` (a distilled student: ``distill``, ``distill_evaluate``); `teacher_model`: the
    registered name under which a distilled bundle's teacher is looked up for its
    ``gptflow.teacher_version`` tag.
    """
    from flows.registry import pyfunc_model

    bundle, evaluation, out_dir = Path(bundle).resolve(), Path(evaluation), Path(out_dir)
    meta = check_bundle(bundle)
    metrics = json.loads((evaluation / "metrics.json").read_text(encoding="utf-8"))
    digest = sha256_file(bundle / "model.safetensors")
    registry = Registry(ctx.tracking, ctx.workdir)
    existing = _version_of_bundle(registry, cfg.name, digest)
    if existing is not None:
        log.info("register: %s is already %s version %s", bundle, cfg.name, existing)
        version, reused = existing, True
    else:
        code_paths = [str(Path(__import__("gptcore").__file__).parent)]
        uri = registry.log_bundle_model(
            bundle,
            pyfunc_model.__file__,
            code_paths,
            pip_requirements(),
            pyfunc_model.PARAMS,
            ["The "],
        )
        tags = lineage_tags(
            meta,
            bundle,
            digest,
            metrics,
            evaluation,
            dataset,
            ctx,
            registry,
            cfg.name,
            stage_steps,
            teacher_model,
        )
        version, reused = registry.register(uri, cfg.name, tags), False
        log.info("register: %s -> %s version %s", bundle, cfg.name, version)
    result = {
        "name": cfg.name,
        "version": version,
        "bundle": str(bundle),
        "bundle_sha256": digest,
        "reused": reused,
    }
    ctx.tracker.set_tags(
        {"gptflow.registered_model": cfg.name, "gptflow.registered_version": version}
    )
    atomic_write_text(out_dir / RESULT, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return out_dir


def _version_of_bundle(registry: Registry, name: str, digest: str) -> str | None:
    try:
        versions = registry.versions(name)
    except RegistryError:  # no such model yet
        return None
    return next(
        (v["version"] for v in versions if v["tags"].get("gptflow.bundle_sha256") == digest), None
    )


def lineage_tags(
    meta: dict[str, Any],
    bundle: Path,
    digest: str,
    metrics: dict[str, Any],
    evaluation: Path,
    dataset: Path,
    ctx: StepContext,
    registry: Registry,
    name: str,
    stage_steps: tuple[str, str] | None = None,
    teacher_model: str | None = None,
) -> dict[str, Any]:
    stage = meta.get("stage") or "pretrain"
    train_step, eval_step = stage_steps or (stage, "evaluate")
    parent = meta.get("parent")
    tags: dict[str, Any] = {
        "gptflow.bundle": bundle,
        "gptflow.bundle_sha256": digest,
        "gptflow.stage": stage,
        "gptflow.dataset": meta.get("dataset", ""),
        "gptflow.dataset_manifest_sha256": meta.get("dataset_manifest_sha256", ""),
        "gptflow.tokenizer_sha256": sha256_file(bundle / "tokenizer.json"),
        "gptflow.config_hash": meta.get("config_hash", ""),
        "gptflow.git_commit": meta.get("git_commit") or "",
        "gptflow.run.pipeline": ctx.parent_run_id or "",
        "gptflow.run.train": ctx.step_runs.get(train_step, ""),
        "gptflow.run.evaluate": ctx.step_runs.get(eval_step, ""),
        "gptflow.evaluation": evaluation.resolve(),
        "gptflow.eval_dataset": Path(dataset).resolve(),
        "gptflow.parent": json.dumps(parent, sort_keys=True),
    }
    if isinstance(parent, dict) and parent.get("model_sha256"):
        found = _version_of_bundle(registry, name, parent["model_sha256"])
        if found:
            tags["gptflow.parent_version"] = found
    teacher = meta.get("teacher")
    if isinstance(teacher, dict):  # a distilled student: which model taught it, and how
        tags["gptflow.teacher"] = json.dumps(teacher, sort_keys=True)
        tags["gptflow.distillation"] = json.dumps(meta.get("distillation") or {}, sort_keys=True)
        uri = str(teacher.get("uri") or "")
        # A teacher named by the registry is looked up under its own name; a bundle, under
        # teacher_model.
        where = (
            uri.removeprefix("models:/").split("@")[0].split("/")[0]
            if uri.startswith("models:/")
            else teacher_model
        )
        found = _version_of_bundle(registry, where, teacher["model_sha256"]) if where else None
        if found:
            tags["gptflow.teacher_version"] = f"{where}/{found}"
    for key in ("val_loss", "val_perplexity", "val_bits_per_byte", "sft_val_loss", "smoke_passed"):
        if key in metrics:
            tags[f"gptflow.eval.{key}"] = metrics[key]
    return tags
