"""Eval-gated promotion, forced promotion and rollback of a registered model's ``champion`` alias.

A new version gets alias ``challenger``; it becomes ``champion`` when
:func:`flows.registry.gate.decide` says so. The current champion is re-evaluated on the *same*
dataset as the challenger (the dataset may have changed since the champion was trained): on its
token ids when both share the dataset's tokenizer, on its text otherwise (bits per byte compare
across tokenizers). The decision and both figures go on the version's tags and the promote step's
run; the registered model keeps the history of champions (tag ``gptflow.champion_history``) so that
:func:`rollback` finds the previous one.

The read-compare-set runs under an exclusive lock per model name held in the registry itself
(:func:`promotion_lock`: a registered model whose creation is atomic), so two pipelines finishing at
once -- in one workdir or in two that share the registry -- never lose a decision or leave the worse
model champion. The gate's verdict is tagged on the version before the alias moves, and a version's
downloaded weights are checked against its ``gptflow.bundle_sha256`` tag (:func:`bundle_of`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flows.config import EvaluateConfig, RegistryConfig
from flows.context import StepContext
from flows.registry.gate import Decision, Figures, decide
from flows.registry.register import RESULT as REGISTERED
from flows.tracking import Registry, RegistryError, Tracker
from flows.workdir import (
    DONE,
    atomic_write_text,
    discard,
    fsync_dir,
    is_done,
    locked,
    mark_done,
    sha256_file,
    tmp_suffix,
)

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "gptflow.champion_history"
DECISION = "decision.json"


def lock_path(workdir: str | Path, name: str) -> Path:
    return Path(workdir) / "registry" / f"{name}.lock"


LOCK_SUFFIX = ".gptflow-promote-lock"
LOCK_STALE_S = (
    120.0  # a holder refreshes its heartbeat every LOCK_STALE_S / 4; silent this long, it is gone
)
LOCK_WAIT_S = 1800.0


@contextlib.contextmanager
def promotion_lock(
    registry: Registry,
    name: str,
    workdir: str | Path,
    stale_s: float = LOCK_STALE_S,
    wait_s: float = LOCK_WAIT_S,
) -> Iterator[None]:
    """Exclusive right to read-compare-set `name`'s aliases and history, across every workdir,
    process and machine that uses this registry.

    The lock lives in the registry itself: a registered model ``<name>.gptflow-promote-lock``, whose
    creation the store makes atomic. Its holder keeps a heartbeat tag fresh; a lock whose heartbeat
    is older than `stale_s` belonged to a process that died and is broken. The workdir's file lock
    is taken first, so processes of one workdir queue cheaply without polling the registry.
    """
    lock = f"{name}{LOCK_SUFFIX}"
    token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with locked(lock_path(workdir, name)):
        deadline = time.time() + wait_s
        while not registry.create_model(
            lock,
            {"gptflow.lock.token": token, "gptflow.lock.heartbeat": time.time()},
            f"held while gptflow promotes {name!r}; deleted when done",
        ):
            _break_if_stale(registry, lock, stale_s)
            if time.time() > deadline:
                raise RegistryError(
                    f"model {name!r}: another promotion has held {lock!r} for over {wait_s:.0f} s"
                )
            time.sleep(0.2 + random.random() * 0.3)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(stale_s / 4):
                try:
                    registry.set_model_tags(lock, {"gptflow.lock.heartbeat": time.time()})
                except (
                    RegistryError
                ) as e:  # the next beat may get through; a missed one is not fatal
                    log.warning("promotion lock heartbeat: %s", e)

        heart = threading.Thread(target=beat, name="gptflow-promote-lock", daemon=True)
        heart.start()
        try:
            yield
        finally:
            stop.set()
            heart.join()
            registry.delete_model(lock)


def _break_if_stale(registry: Registry, lock: str, stale_s: float) -> None:
    try:
        tags = registry.model_tags(lock)
        beat = float(tags.get("gptflow.lock.heartbeat", "0"))
    except (RegistryError, ValueError):
        return  # released meanwhile (or being created): try again
    if time.time() - beat > stale_s:
        try:
            if registry.model_tags(lock).get("gptflow.lock.token") == tags.get(
                "gptflow.lock.token"
            ):
                log.warning(
                    "breaking promotion lock %r: its holder %s stopped beating %.0f s ago",
                    lock,
                    tags.get("gptflow.lock.token"),
                    time.time() - beat,
                )
                registry.delete_model(lock)
        except RegistryError:
            pass


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
    registry.set_version_tags(
        name,
        version,
        {
            "gptflow.champion_since": int(time.time() * 1000),
            "gptflow.champion_why": why,
            "gptflow.previous_champion": before["version"] if before else "",
        },
    )
    return before["version"] if before else None


class BundleMismatch(RegistryError):
    """A version's downloaded weights are not the ones its ``gptflow.bundle_sha256`` tag names."""


SHA_TAG = "gptflow.bundle_sha256"


def bundle_of(
    registry: Registry, name: str, version: str, cache: Path, require_sha: bool = False
) -> Path:
    """The bundle directory inside a version's downloaded model, cached by version and verified.

    The download goes to a temporary directory beside the cache entry; its model.safetensors is
    checked against the version's ``gptflow.bundle_sha256`` tag, the directory renamed into place,
    then marked DONE. A killed download leaves only a temporary directory (removed by the next try),
    never an entry that looks complete; an entry whose weights are not the version's (a registry
    reset that reused the number, a corrupted file) is downloaded again. A version without the tag
    is served only when not `require_sha`; weights that do not match it raise BundleMismatch.
    """
    want = registry.version(name, version)["tags"].get(SHA_TAG)
    if require_sha and not want:
        raise BundleMismatch(
            f"model {name!r} version {version} has no {SHA_TAG} tag: its weights cannot be "
            "verified (register it through the pipeline)"
        )
    dst = cache / f"{name}-v{version}"
    cache.mkdir(parents=True, exist_ok=True)
    with locked(cache / f".{dst.name}.lock"):  # another run's download in progress is not "missing"
        found = _verified(dst, want)
        if found is None:
            discard(dst)
            tmp = cache / f".{dst.name}.{tmp_suffix()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                registry.download(name, version, tmp)
                weights = next((p for p in tmp.rglob("model.safetensors")), None)
                if weights is None:
                    raise RegistryError(
                        f"model {name!r} version {version}: its artifacts hold no bundle "
                        "(model.safetensors)"
                    )
                digest = sha256_file(weights)
                if want and digest != want:
                    raise BundleMismatch(
                        f"model {name!r} version {version}: the downloaded weights have sha256 "
                        f"{digest[:12]}..., its {SHA_TAG} tag says {want[:12]}...: refused"
                    )
                inner = weights.parent.relative_to(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            os.replace(tmp, dst)
            fsync_dir(cache)
            mark_done(
                dst, {"name": name, "version": str(version), "sha256": digest, "bundle": str(inner)}
            )
            found = dst / inner
    return found


def _verified(dst: Path, want: str | None) -> Path | None:
    """The cached bundle directory when its download finished and its weights still hash to
    `want`."""
    if not is_done(dst):
        return None
    try:
        info = json.loads((dst / DONE).read_text(encoding="utf-8"))
        bundle = dst / info["bundle"]
        digest = sha256_file(bundle / "model.safetensors")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if digest != info.get("sha256") or (want and digest != want):
        log.warning(
            "%s: cached weights are not the version's (sha256 %s...); downloading again",
            dst,
            digest[:12],
        )
        return None
    return bundle


def figures_on(bundle: Path, dataset: Path, cfg: EvaluateConfig) -> Figures:
    """A bundle's figures on a dataset's val split: by token ids with the dataset's tokenizer, by
    text with another."""
    from flows.data.dataset import read_manifest
    from flows.evaluate import metrics
    from gptcore import Tokenizer, load_bundle

    try:
        model, tok, _ = load_bundle(bundle)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise RegistryError(
            f"{bundle}: cannot load the model ({e}); its artifacts are missing or corrupt"
        ) from e
    manifest = read_manifest(dataset, splits=("val", "sft_val"), verify=True)
    data_tok = Tokenizer.load(Path(dataset) / "tokenizer.json")
    T = cfg.context_length or model.config.context_length
    sft = float("nan")
    if tok.sha256() == data_tok.sha256():
        totals = metrics.val_loss(model, tok, dataset, manifest, T, cfg.batch_size, cfg.max_tokens)
        if metrics.has_tokens(
            manifest, "sft_val"
        ):  # by token ids only: the loss mask is the data's
            sft_totals = metrics.sft_val_loss(model, dataset, manifest, T, cfg.batch_size)
            sft = sft_totals.mean_loss if sft_totals.tokens else sft
    else:
        totals = metrics.val_text_loss(
            model, tok, dataset, manifest, data_tok, T, cfg.batch_size, cfg.max_tokens
        )
    return Figures(
        bits_per_byte=totals.bits_per_byte, perplexity=totals.perplexity, sft_val_loss=sft
    )


def challenger_figures(evaluation: Path) -> Figures:
    m = json.loads((Path(evaluation) / "metrics.json").read_text(encoding="utf-8"))
    if "val_bits_per_byte" not in m:
        raise RegistryError(
            f"{evaluation / 'metrics.json'}: no validation figures to gate on ({m.get('notes')})"
        )
    return Figures(
        m["val_bits_per_byte"],
        m["val_perplexity"],
        m.get("smoke_passed") is not False,
        smoke_checked=m.get("smoke_passed") is not None,
        sft_val_loss=m.get("sft_val_loss", float("nan")),
    )


def promote_version(
    registry: Registry,
    name: str,
    version: str,
    cfg: RegistryConfig,
    eval_cfg: EvaluateConfig,
    workdir: Path,
    tracker: Tracker | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Gate `version` of `name` against the champion and move ``champion`` when it passes (or
    `force`).

    The challenger's figures are its evaluation's (tag ``gptflow.evaluation``); the champion is
    re-evaluated on the challenger's dataset (tag ``gptflow.eval_dataset``). Returns the decision
    record.
    """
    tracker = tracker or Tracker()
    with promotion_lock(registry, name, workdir):
        mv = registry.version(name, version)
        tags = mv["tags"]
        registry.set_alias(name, CHALLENGER, version)
        champion = registry.by_alias(name, CHAMPION)
        if champion is not None and champion["version"] == version:
            record = {
                "name": name,
                "version": version,
                "promoted": False,
                "reason": "already champion",
            }
            return record
        decision, theirs_figures = _gate(
            registry, name, version, tags, champion, cfg, eval_cfg, workdir, force
        )
        # The gate's verdict goes on the version before the alias moves: a replica that follows the
        # alias serves only a version whose gptflow.gate tag says passed.
        registry.set_version_tags(name, version, decision.tags())
        previous = (
            _become_champion(registry, name, version, decision.reason) if decision.promote else None
        )
        record = {
            "name": name,
            "version": version,
            "promoted": decision.promote,
            "reason": decision.reason,
            "decision": decision.to_dict(),
            "champion_before": champion["version"] if champion else None,
            "previous_champion": previous,
            "champion_figures": theirs_figures.__dict__ if theirs_figures else None,
        }
    _record(tracker, name, version, decision)
    return record


def _gate(
    registry: Registry,
    name: str,
    version: str,
    tags: dict[str, str],
    champion: dict[str, Any] | None,
    cfg: RegistryConfig,
    eval_cfg: EvaluateConfig,
    workdir: Path,
    force: bool,
) -> tuple[Decision, Figures | None]:
    """The gate's decision on `version` against `champion` (re-scored on the challenger's dataset),
    and the champion's figures (None when there is none, or with `force`)."""
    if force:
        decision = Decision(
            True, "forced (gptflow promote --force)", cfg.metric, float("nan"), None, cfg.margin
        )
        theirs_figures: Figures | None = None
    else:
        evaluation, dataset = tags.get("gptflow.evaluation"), tags.get("gptflow.eval_dataset")
        if not evaluation or not dataset:
            raise RegistryError(
                f"model {name!r} version {version} records no evaluation to gate on; "
                "register it through the pipeline, or promote it with --force"
            )
        ours = challenger_figures(Path(evaluation))
        theirs_figures = None
        if champion is not None:
            cache = workdir / "registry" / "cache"
            theirs_figures = figures_on(
                bundle_of(registry, name, champion["version"], cache), Path(dataset), eval_cfg
            )
        decision = decide(ours, theirs_figures, cfg.margin, cfg.metric)
    return decision, theirs_figures


def _record(tracker: Tracker, name: str, version: str, decision: Decision) -> None:
    """The decision on the promote step's MLflow run, and in the log."""
    tracker.set_tags(
        {
            "gptflow.gate": "passed" if decision.promote else "refused",
            "gptflow.gate.reason": decision.reason,
            "gptflow.model": f"{name}/{version}",
        }
    )
    tracker.log_metrics(
        {
            "gate.promoted": float(decision.promote),
            "gate.challenger": decision.challenger,
            **({"gate.champion": decision.champion} if decision.champion is not None else {}),
        }
    )
    log.info(
        "promote %s/%s: %s (%s)",
        name,
        version,
        "champion" if decision.promote else "refused",
        decision.reason,
    )


def rollback(registry: Registry, name: str, workdir: Path) -> dict[str, Any]:
    """Move ``champion`` back to the champion before the current one; recorded on both versions."""
    with promotion_lock(registry, name, workdir):
        current = registry.by_alias(name, CHAMPION)
        if current is None:
            raise RegistryError(f"model {name!r} has no champion to roll back")
        history = _history(registry, name)
        while history and history[-1] == current["version"]:
            history.pop()
        if not history:
            raise RegistryError(
                f"model {name!r}: champion version {current['version']} has no previous champion "
                "to roll back to"
            )
        previous = history[-1]
        registry.set_alias(name, CHAMPION, previous)
        registry.set_model_tags(name, {HISTORY_TAG: json.dumps(history)})
        stamp = int(time.time() * 1000)
        registry.set_version_tags(
            name,
            current["version"],
            {"gptflow.rolled_back_at": stamp, "gptflow.rolled_back_to": previous},
        )
        registry.set_version_tags(
            name,
            previous,
            {"gptflow.restored_at": stamp, "gptflow.restored_from": current["version"]},
        )
    log.info("rollback %s: champion %s -> %s", name, current["version"], previous)
    return {"name": name, "from": current["version"], "to": previous}


def promote(
    cfg: RegistryConfig, eval_cfg: EvaluateConfig, registered: Path, out_dir: Path, ctx: StepContext
) -> Path:
    """The pipeline's promote step: gate the version the register step made."""
    reg = json.loads((Path(registered) / REGISTERED).read_text(encoding="utf-8"))
    registry = Registry(ctx.tracking, ctx.workdir)
    record = promote_version(
        registry, reg["name"], reg["version"], cfg, eval_cfg, Path(ctx.workdir), ctx.tracker
    )
    atomic_write_text(
        Path(out_dir) / DECISION, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
    )
    return Path(out_dir)
