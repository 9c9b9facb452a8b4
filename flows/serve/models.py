"""What a replica serves: the model behind NAME@ALIAS (or a bundle directory), loaded and checked.

:class:`ServeSettings` is everything a replica needs, resolved on the driver and picklable (no
secrets: the API key travels as its SHA-256). :func:`load` turns a bundle into a :class:`Loaded`
model with its engine and decode thread, after a check that it generates (load_bundle itself
refuses a tokenizer that does not match the weights). :func:`resolve` asks the registry which
version an alias names now and fetches its bundle (cached per version).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flows.config import ServeConfig
from flows.serve.protocol import Limits
from flows.serve.runner import EngineRunner, RunnerStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """A replica's configuration: the serve section plus what the driver resolved."""

    serve: ServeConfig
    served_name: str
    bundle: str | None  # a fixed bundle directory, or None to follow the registry alias below
    registry_name: str | None
    alias: str | None
    tracking_uri: str | None
    cache_dir: str
    api_key_sha256: str | None


@dataclass
class Loaded:
    """One model version ready to serve."""

    version: str | None  # the registry version, None for a bundle directory
    source: str
    model: object
    tokenizer: object
    runner: EngineRunner
    limits: Limits
    stop_ids: frozenset[int]
    grounder: object | None = (
        None  # serve.knowledge: BM25 over the facts of the model's dataset (grounding.py)
    )


def load(
    bundle: str | Path, version: str | None, cfg: ServeConfig, stats: RunnerStats | None = None
) -> Loaded:
    """Load `bundle` into a new engine and decode thread; ValueError (naming it) if it is
    unusable."""
    import torch

    from gptcore import generate, load_bundle
    from gptcore.batching import BatchEngine

    device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    try:
        model, tokenizer, metadata = load_bundle(bundle, device=device)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"cannot load the model at {bundle}: {e}") from e
    grounder = _grounder(bundle, metadata) if cfg.knowledge else None
    try:  # it must generate before it may serve
        generate(model, [tokenizer.eot_id], 1)
    except Exception as e:  # noqa: BLE001 - any failure here means "do not serve this"
        raise ValueError(f"the model at {bundle} fails to generate: {e}") from e
    ctx = model.config.context_length
    limits = Limits(
        context_length=ctx,
        max_prompt_tokens=min(cfg.max_prompt_tokens or ctx - 1, ctx - 1),
        max_tokens_limit=cfg.max_tokens_limit,
        max_n=cfg.max_n,
        max_prompts=cfg.max_prompts,
    )
    engine = BatchEngine(
        model,
        max_batch_size=cfg.max_batch_size,
        max_batch_tokens=cfg.max_batch_tokens,
        tokenizer=tokenizer,
    )
    runner = EngineRunner(engine, cfg.max_queue, stats)
    return Loaded(
        version,
        str(bundle),
        model,
        tokenizer,
        runner,
        limits,
        frozenset(tokenizer.stop_ids),
        grounder,
    )


def _grounder(bundle: str | Path, metadata: dict) -> object:
    """serve.knowledge: the facts of the dataset the model was trained on (its metadata names
    it)."""
    from flows.serve.grounding import Grounder

    dataset = metadata.get("dataset")
    if not dataset:
        raise ValueError(
            f"serve.knowledge: the model at {bundle} names no dataset in its metadata.json"
        )
    return Grounder.from_dataset(dataset)


def registry(settings: ServeSettings):
    from flows.config import TrackingConfig
    from flows.tracking import Registry

    return Registry(TrackingConfig(uri=settings.tracking_uri), settings.cache_dir)


def alias_version(settings: ServeSettings) -> str:
    """The version NAME@ALIAS names now; ValueError when the alias is not set."""
    found = registry(settings).by_alias(settings.registry_name, settings.alias)
    if found is None:
        raise ValueError(
            f"model {settings.registry_name!r} has no alias {settings.alias!r}: "
            "nothing to serve yet (promote a version, or serve a bundle directory)"
        )
    return found["version"]


class Refused(ValueError):
    """A version a replica will not serve. `final`: its weights are wrong, it stays refused;
    otherwise (the gate has not passed it) it is looked at again at the next poll."""

    def __init__(self, message: str, final: bool):
        super().__init__(message)
        self.final = final


def fetch(settings: ServeSettings, version: str) -> Path:
    """The bundle of `version`, downloaded once into the cache, once the registry says it passed the
    promotion gate (tag ``gptflow.gate``) and its weights hash to its ``gptflow.bundle_sha256`` tag:
    an alias moved by hand to an unvetted or tampered version is not served. Other errors (the
    registry unreachable) are the caller's to retry."""
    from flows.registry.promote import BundleMismatch, bundle_of

    reg, name = registry(settings), settings.registry_name
    gate = reg.version(name, version)["tags"].get("gptflow.gate")
    if gate != "passed":
        raise Refused(
            f"model {name!r} version {version} has not passed the promotion gate (gptflow.gate="
            f"{gate!r}); promote it with `gptflow promote` (or --force)",
            final=False,
        )
    try:
        return bundle_of(reg, name, version, Path(settings.cache_dir), require_sha=True)
    except BundleMismatch as e:
        raise Refused(str(e), final=True) from e
