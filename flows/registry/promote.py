"""Eval-gated promotion, forced promotion and rollback of a registered model's ``champion`` alias.

A new version gets alias ``challenger``; it becomes ``champion`` when :func:`flows.registry.gate.decide`
says so. The current champion is re-evaluated on the *same* dataset as the challenger (the dataset
may have changed since the champion was trained): on its token ids when both share the dataset's
tokenizer, on its text otherwise (bits per byte compare across tokenizers). The decision and both
figures go on the version's tags and the promote step's run; the registered model keeps the history
of champions (tag ``gptflow.champion_history``) so that :func:`rollback` finds the previous one.

The read-compare-set runs under an exclusive lock per model name (``<workdir>/registry/<name>.lock``),
so two pipelines finishing at once never lose a decision or leave the worse model champion. The lock
is a file lock: it serialises processes that share the workdir (one machine, or a shared filesystem
whose locks work across nodes).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from flows.config import EvaluateConfig, RegistryConfig
from flows.context import StepContext
from flows.registry.gate import Decision, Figures, decide
from flows.registry.register import RESULT as REGISTERED
from flows.store import atomic_write_text, locked
from flows.tracking import Registry, RegistryError, Tracker

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "gptflow.champion_history"
DECISION = "decision.json"


def lock_path(workdir: str | Path, name: str) -> Path:
    return Path(workdir) / "registry" / f"{name}.lock"


def _history(registry: Registry, name: str) -> list[str]:
    raw = registry.model_tags(name).get(HISTORY_TAG, "[]")
    try:
        history = json.loads(raw)
    except ValueError:
        history = []
    return [str(v) for v in history] if isinstance(history, list) else []


def _become_champion(registry: Registry, name: str, version: str, why: str) -> str | None:
    """Move the alias and record it; returns the previous champion's version (or None)."""
    before = registry.by_alias(name, CHAMPION)
    registry.set_alias(name, CHAMPION, version)
    history = _history(registry, name)
    registry.set_model_tags(name, {HISTORY_TAG: json.dumps([*history, version])})
    registry.set_version_tags(name, version, {"gptflow.champion_since": int(time.time() * 1000),
                                              "gptflow.champion_why": why,
                                              "gptflow.previous_champion": before["version"] if before else ""})
    return before["version"] if before else None


def bundle_of(registry: Registry, name: str, version: str, cache: Path) -> Path:
    """The bundle directory inside a version's downloaded model (cached by version)."""
    dst = cache / f"{name}-v{version}"
    cache.mkdir(parents=True, exist_ok=True)
    with locked(cache / f".{dst.name}.lock"):  # another run's download in progress is not "missing"
        found = next((p for p in dst.rglob("model.safetensors")), None) if dst.exists() else None
        if found is None:
            shutil.rmtree(dst, ignore_errors=True)
            registry.download(name, version, dst)
            found = next((p for p in dst.rglob("model.safetensors")), None)
    if found is None:
        raise RegistryError(f"model {name!r} version {version}: its artifacts hold no bundle (model.safetensors)")
    return found.parent


def figures_on(bundle: Path, dataset: Path, cfg: EvaluateConfig) -> Figures:
    """A bundle's figures on a dataset's val split: by token ids with the dataset's tokenizer, by text
    with another."""
    from flows.data.dataset import read_manifest
    from flows.evaluate import metrics
    from gptcore import Tokenizer, load_bundle

    try:
        model, tok, _ = load_bundle(bundle)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise RegistryError(f"{bundle}: cannot load the model ({e}); its artifacts are missing or corrupt") from e
    manifest = read_manifest(dataset, splits=("val",), verify=True)
    data_tok = Tokenizer.load(Path(dataset) / "tokenizer.json")
    T = cfg.context_length or model.config.context_length
    if tok.sha256() == data_tok.sha256():
        totals = metrics.val_loss(model, tok, dataset, manifest, T, cfg.batch_size, cfg.max_tokens)
    else:
        totals = metrics.val_text_loss(model, tok, dataset, manifest, data_tok, T, cfg.batch_size, cfg.max_tokens)
    return Figures(bits_per_byte=totals.bits_per_byte, perplexity=totals.perplexity)


def challenger_figures(evaluation: Path) -> Figures:
    m = json.loads((Path(evaluation) / "metrics.json").read_text(encoding="utf-8"))
    if "val_bits_per_byte" not in m:
        raise RegistryError(f"{evaluation / 'metrics.json'}: no validation figures to gate on ({m.get('notes')})")
    return Figures(m["val_bits_per_byte"], m["val_perplexity"], bool(m.get("smoke_passed")))


def promote_version(registry: Registry, name: str, version: str, cfg: RegistryConfig, eval_cfg: EvaluateConfig,
                    workdir: Path, tracker: Tracker | None = None, force: bool = False) -> dict[str, Any]:
    """Gate `version` of `name` against the champion and move ``champion`` when it passes (or `force`).

    The challenger's figures are its evaluation's (tag ``gptflow.evaluation``); the champion is
    re-evaluated on the challenger's dataset (tag ``gptflow.eval_dataset``). Returns the decision record.
    """
    tracker = tracker or Tracker()
    with locked(lock_path(workdir, name)):
        mv = registry.version(name, version)
        tags = mv["tags"]
        registry.set_alias(name, CHALLENGER, version)
        champion = registry.by_alias(name, CHAMPION)
        if champion is not None and champion["version"] == version:
            record = {"name": name, "version": version, "promoted": False, "reason": "already champion"}
            return record
        if force:
            decision = Decision(True, "forced (gptflow promote --force)", cfg.metric, float("nan"), None, cfg.margin)
            theirs_figures: Figures | None = None
        else:
            evaluation, dataset = tags.get("gptflow.evaluation"), tags.get("gptflow.eval_dataset")
            if not evaluation or not dataset:
                raise RegistryError(f"model {name!r} version {version} records no evaluation to gate on; "
                                    "register it through the pipeline, or promote it with --force")
            ours = challenger_figures(Path(evaluation))
            theirs_figures = None
            if champion is not None:
                cache = workdir / "registry" / "cache"
                theirs_figures = figures_on(bundle_of(registry, name, champion["version"], cache), Path(dataset), eval_cfg)
            decision = decide(ours, theirs_figures, cfg.margin, cfg.metric)
        previous = _become_champion(registry, name, version, decision.reason) if decision.promote else None
        registry.set_version_tags(name, version, decision.tags())
        record = {"name": name, "version": version, "promoted": decision.promote, "reason": decision.reason,
                  "decision": decision.to_dict(), "champion_before": champion["version"] if champion else None,
                  "previous_champion": previous,
                  "champion_figures": theirs_figures.__dict__ if theirs_figures else None}
    tracker.set_tags({"gptflow.gate": "passed" if decision.promote else "refused", "gptflow.gate.reason": decision.reason,
                      "gptflow.model": f"{name}/{version}"})
    tracker.log_metrics({"gate.promoted": float(decision.promote), "gate.challenger": decision.challenger,
                         **({"gate.champion": decision.champion} if decision.champion is not None else {})})
    log.info("promote %s/%s: %s (%s)", name, version, "champion" if decision.promote else "refused", decision.reason)
    return record


def rollback(registry: Registry, name: str, workdir: Path) -> dict[str, Any]:
    """Move ``champion`` back to the champion before the current one; recorded on both versions."""
    with locked(lock_path(workdir, name)):
        current = registry.by_alias(name, CHAMPION)
        if current is None:
            raise RegistryError(f"model {name!r} has no champion to roll back")
        history = _history(registry, name)
        while history and history[-1] == current["version"]:
            history.pop()
        if not history:
            raise RegistryError(f"model {name!r}: champion version {current['version']} has no previous champion "
                                "to roll back to")
        previous = history[-1]
        registry.set_alias(name, CHAMPION, previous)
        registry.set_model_tags(name, {HISTORY_TAG: json.dumps(history)})
        stamp = int(time.time() * 1000)
        registry.set_version_tags(name, current["version"], {"gptflow.rolled_back_at": stamp,
                                                             "gptflow.rolled_back_to": previous})
        registry.set_version_tags(name, previous, {"gptflow.restored_at": stamp,
                                                   "gptflow.restored_from": current["version"]})
    log.info("rollback %s: champion %s -> %s", name, current["version"], previous)
    return {"name": name, "from": current["version"], "to": previous}


def promote(cfg: RegistryConfig, eval_cfg: EvaluateConfig, registered: Path, out_dir: Path, ctx: StepContext) -> Path:
    """The pipeline's promote step: gate the version the register step made."""
    reg = json.loads((Path(registered) / REGISTERED).read_text(encoding="utf-8"))
    registry = Registry(ctx.tracking, ctx.workdir)
    record = promote_version(registry, reg["name"], reg["version"], cfg, eval_cfg, Path(ctx.workdir), ctx.tracker)
    atomic_write_text(Path(out_dir) / DECISION, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return Path(out_dir)
