"""A model named by SOURCE, as a bundle under ``<workdir>/import/<hash>/``: the one way from a
source to a bundle.

SOURCE is what ``gptflow import`` takes (``builtin:NAME``, a Hugging Face directory, a ``.gguf``
file), a bundle directory, or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``. :func:`identity`
names the output by the source's content: a builtin by its pinned sha256, a file or directory by
the sha256 of the files the import reads (cached by size and mtime), a registry URI by the version
it resolves to now (so a moved alias is a new import). The pipeline's ``import`` step
(``model.base``) gets its output directory from the runner, whose hash of that identity is
:func:`import_dir`'s; ``pretrain.init``, ``finetune.init`` and ``distill.teacher`` go through
:func:`ensure`, which builds the same directory under the runner's lock and DONE marker. Either
way a source is imported once per workdir.

What it is not: the format readers (gptcore.hf, gptcore.gguf via flows/models/importer.py) or the
bundle format (gptcore.bundle).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from flows.config import ConfigError, stable_hash
from flows.context import StepContext
from flows.models.sources import BUILTINS, PREFIX, is_builtin
from flows.workdir import discard, is_done, locked, mark_done, stage_dir

log = logging.getLogger(__name__)

STEP = "import"
# Part of every import's identity: bump it when the import writes something else from the same
# source.
IMPORT_VERSION = 1
BUNDLE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "metadata.json")
# Everything an import may read from a directory: its content is the directory's identity.
_SOURCE_FILES = (
    *BUNDLE_FILES,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "model.safetensors.index.json",
)


def is_bundle(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in BUNDLE_FILES)


def identity(source: str, ctx: StepContext) -> dict[str, Any]:
    """What names SOURCE's import: its content, not its name. ConfigError for a source that is not
    there."""
    if is_builtin(source):
        name = source.removeprefix(PREFIX)
        if name not in BUILTINS:
            raise ConfigError(
                f"{source}: unknown built-in model; known: "
                f"{', '.join(PREFIX + n for n in BUILTINS)}"
            )
        return {"builtin": name, "sha256": BUILTINS[name].sha256, "import_version": IMPORT_VERSION}
    if source.startswith("models:/"):
        from flows.registry.lineage import resolve
        from flows.tracking import Registry

        registry = Registry(ctx.tracking, ctx.workdir)
        name, version = resolve(registry, source)
        return {
            "uri": source,
            "name": name,
            "version": version,
            "bundle_sha256": registry.version(name, version)["tags"].get("gptflow.bundle_sha256"),
        }
    path = Path(source)
    if path.is_file():
        return {
            "file": path.name,
            "sha256": ctx.fingerprints.sha256(path),
            "import_version": IMPORT_VERSION,
        }
    if path.is_dir():
        files = [path / n for n in _SOURCE_FILES] + sorted(path.glob("*.safetensors"))
        return {
            "directory": {p.name: ctx.fingerprints.sha256(p) for p in files if p.is_file()},
            "import_version": IMPORT_VERSION,
        }
    raise ConfigError(
        f"{source}: no such file or directory (a model source is builtin:NAME, a Hugging Face "
        "directory, a .gguf file, a bundle directory or models:/NAME@ALIAS)"
    )


def import_dir(workdir: str | Path, ident: dict[str, Any]) -> Path:
    """Where the import of a source with identity `ident` lives: the runner's path for the import
    step (a step of no config sections and no inputs, whose fingerprint is the identity)."""
    return stage_dir(workdir, STEP, stable_hash(STEP, {}, {}, ident)).resolve()


def build(source: str, out: Path, ctx: StepContext, ident: dict[str, Any] | None = None) -> Path:
    """Write SOURCE as a bundle into `out` (the runner, or :func:`ensure`, writes DONE after)."""
    from flows.models.importer import load_source

    out.mkdir(parents=True, exist_ok=True)
    lineage = {"source": source, "source_identity": ident or identity(source, ctx)}
    if source.startswith("models:/"):
        from flows.tracking import download_model

        tmp = out / ".download"
        shutil.rmtree(tmp, ignore_errors=True)
        found = find_bundle(download_model(source, tmp, ctx.tracking, ctx.workdir))
        if found is None:
            raise ConfigError(
                f"{source}: the downloaded model holds no bundle ({', '.join(BUNDLE_FILES)})"
            )
        _copy_bundle(found, out)
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    if is_bundle(Path(source)):
        _copy_bundle(Path(source), out)
        return out
    from gptcore.bundle import save_bundle

    try:
        model, tok, meta = load_source(source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{source}: cannot import: {e}") from e
    save_bundle(out, model, tok, {**meta, **lineage})
    log.info("imported %s (%s parameters) into %s", source, f"{model.num_params():,}", out)
    return out


def ensure(source: str, ctx: StepContext) -> Path:
    """SOURCE's bundle in the workdir's import directory, imported now unless already done."""
    ident = identity(source, ctx)
    out = import_dir(ctx.workdir, ident)
    if not is_done(out):
        with locked(out.parent / f".{out.name}.lock"):  # the runner's lock: one import at a time
            if not is_done(out):
                if out.exists():
                    discard(out)  # an interrupted import
                build(source, out, ctx, ident)
                mark_done(out, {"step": STEP, "source": source})
    ctx.fingerprints.save()
    return out


def find_bundle(root: Path) -> Path | None:
    """`root` itself if it holds the bundle files, else the shallowest folder under it that does."""
    candidates = [root] + sorted(
        (p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts)
    )
    return next((d for d in candidates if is_bundle(d)), None)


def _copy_bundle(src: Path, out: Path) -> None:
    """The bundle's files into `out`, hard-linked where the filesystem allows (bundles are never
    rewritten in place), metadata.json last: a directory that has it is complete."""
    names = [
        n
        for n in (*BUNDLE_FILES, "tokenizer_config.json")
        if (src / n).is_file() and n != "metadata.json"
    ]
    for name in [*names, "metadata.json"]:
        dst = out / name
        dst.unlink(missing_ok=True)
        try:
            os.link(src / name, dst)
        except OSError:
            shutil.copyfile(src / name, dst)
