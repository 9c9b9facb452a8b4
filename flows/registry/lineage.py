"""Where a registered model came from, read from the registry, the runs and the stage outputs.

:func:`lineage` follows a version (``NAME@ALIAS`` or ``NAME/VERSION``) to its bundle, the bundle's
training run and dataset, the dataset's raw input fingerprints and tokenizer, and through a
fine-tune's parent bundle to the pretrained model and its own data -- nothing is copied on the side.
Anything that no longer exists (a deleted run, a removed stage directory) is reported as missing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flows.registry.promote import bundle_of
from flows.tracking import Registry, RegistryError
from flows.workdir import sha256_file

_REF = re.compile(r"^(?:models:/)?(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def resolve(registry: Registry, ref: str) -> tuple[str, str]:
    """(name, version) of ``NAME@ALIAS`` or ``NAME/VERSION``; RegistryError naming what is
    unknown."""
    m = _REF.match(ref.strip())
    if not m:
        raise RegistryError(f"{ref!r} is not NAME@ALIAS or NAME/VERSION (e.g. gpt@champion, gpt/3)")
    name = m["name"]
    if m["alias"]:
        found = registry.by_alias(name, m["alias"])
        if found is None:
            raise RegistryError(f"model {name!r} has no alias {m['alias']!r}")
        return name, found["version"]
    registry.version(name, m["version"])
    return name, m["version"]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def dataset_facts(path: str | None, expected_sha: str | None) -> dict[str, Any]:
    if not path:
        return {"missing": True, "why": "not recorded"}
    root = Path(path)
    manifest = _read_json(root / "manifest.json")
    if manifest is None:
        return {"path": path, "missing": True, "why": "manifest.json is gone"}
    sha = sha256_file(root / "manifest.json")
    return {
        "path": path,
        "manifest_sha256": sha,
        "matches_recorded": expected_sha in (None, "", sha),
        "tokenizer_sha256": manifest.get("tokenizer_sha256"),
        "vocab_size": manifest.get("vocab_size"),
        "inputs": [
            {"path": i.get("path"), "kind": i.get("kind"), "fingerprint": i.get("fingerprint")}
            for i in manifest.get("inputs", [])
        ],
        "splits": {k: v.get("tokens") for k, v in manifest.get("splits", {}).items()},
        "config": manifest.get("config"),
    }


def bundle_facts(
    registry: Registry, name: str, path: str | Path | None, depth: int = 0
) -> dict[str, Any]:
    """A bundle, its training (metadata.json), its dataset and, recursively, its parent."""
    if not path:
        return {"missing": True, "why": "not recorded"}
    root = Path(path)
    meta = _read_json(root / "metadata.json")
    if meta is None:
        return {"path": str(path), "missing": True, "why": "metadata.json is gone"}
    facts: dict[str, Any] = {
        "path": str(root),
        "stage": meta.get("stage"),
        "config_hash": meta.get("config_hash"),
        "git_commit": meta.get("git_commit"),
        "steps": meta.get("steps"),
        "final_loss": meta.get("final_loss"),
        "model_sha256": sha256_file(root / "model.safetensors")
        if (root / "model.safetensors").is_file()
        else None,
        "tokenizer_sha256": meta.get("tokenizer_sha256"),
        "train_config": meta.get("train_config"),
        "dataset": dataset_facts(meta.get("dataset"), meta.get("dataset_manifest_sha256")),
    }
    parent = meta.get("parent")
    if isinstance(parent, dict) and depth < 8:
        entry: dict[str, Any] = {k: v for k, v in parent.items()}
        version = _registered_as(registry, name, parent.get("model_sha256"))
        if version:
            entry["registered"] = f"{name}/{version}"
        if parent.get("bundle"):
            entry["bundle_facts"] = bundle_facts(registry, name, parent["bundle"], depth + 1)
        facts["parent"] = entry
    teacher = meta.get("teacher")
    if isinstance(teacher, dict) and depth < 8:  # a distilled student: the model it learned from
        entry = {k: v for k, v in teacher.items()} | {"distillation": meta.get("distillation")}
        if teacher.get("bundle"):
            entry["bundle_facts"] = bundle_facts(registry, name, teacher["bundle"], depth + 1)
        facts["teacher"] = entry
    return facts


def _registered_as(registry: Registry, name: str, digest: str | None) -> str | None:
    if not digest:
        return None
    try:
        return next(
            (
                v["version"]
                for v in registry.versions(name)
                if v["tags"].get("gptflow.bundle_sha256") == digest
            ),
            None,
        )
    except RegistryError:
        return None


def lineage(registry: Registry, ref: str, cache: Path) -> dict[str, Any]:
    name, version = resolve(registry, ref)
    mv = registry.version(name, version)
    tags = mv["tags"]
    runs = {}
    for role in ("pipeline", "train", "evaluate"):
        run_id = tags.get(f"gptflow.run.{role}")
        runs[role] = (
            (registry.run(run_id) or {"run_id": run_id, "missing": True})
            if run_id
            else {"missing": True}
        )
    bundle = tags.get("gptflow.bundle")
    if bundle and not Path(bundle).is_dir():
        try:  # the stage output is gone: the registry's own copy still has the weights and metadata
            bundle = str(bundle_of(registry, name, version, cache))
        except RegistryError:
            pass
    return {
        "model": {
            "name": name,
            "version": version,
            "aliases": mv["aliases"],
            "created": mv["created"],
            "gate": tags.get("gptflow.gate"),
            "gate_reason": tags.get("gptflow.gate.reason"),
            "eval": {
                k.removeprefix("gptflow.eval."): v
                for k, v in tags.items()
                if k.startswith("gptflow.eval.")
            },
            "git_commit": tags.get("gptflow.git_commit"),
            "config_hash": tags.get("gptflow.config_hash"),
            "tokenizer_sha256": tags.get("gptflow.tokenizer_sha256"),
            "teacher_version": tags.get("gptflow.teacher_version"),
        },
        "runs": runs,
        "bundle": bundle_facts(registry, name, bundle),
    }


def render(facts: dict[str, Any]) -> str:
    """The lineage as an indented text tree, for people."""
    m = facts["model"]
    lines = [
        f"{m['name']}/{m['version']}  aliases: {', '.join(m['aliases']) or '-'}  "
        f"gate: {m['gate'] or '-'} ({m['gate_reason'] or ''})",
        f"  eval: {', '.join(f'{k}={v}' for k, v in sorted(m['eval'].items())) or '-'}",
        f"  git {m['git_commit'] or '?'}  config {m['config_hash'] or '?'}  "
        f"tokenizer {str(m['tokenizer_sha256'])[:16]}",
    ]
    for role, run in facts["runs"].items():
        lines.append(
            f"  run {role}: "
            + (
                "MISSING"
                if run.get("missing")
                else f"{run['run_id']} {run['name']} {run['status']}"
            )
        )
    if m.get("teacher_version"):
        lines.append(f"  distilled from {m['teacher_version']}")
    _render_bundle(facts["bundle"], lines, "  ")
    return "\n".join(lines)


def _render_bundle(b: dict[str, Any], lines: list[str], pad: str) -> None:
    if b.get("missing"):
        lines.append(f"{pad}bundle {b.get('path', '?')}: MISSING ({b.get('why')})")
        return
    lines.append(
        f"{pad}bundle {b['path']} "
        f"({b['stage']}, {b['steps']} steps, sha256 {str(b['model_sha256'])[:16]})"
    )
    d = b["dataset"]
    if d.get("missing"):
        lines.append(f"{pad}  dataset {d.get('path', '?')}: MISSING ({d.get('why')})")
    else:
        ok = "" if d["matches_recorded"] else "  (CHANGED since training)"
        lines.append(f"{pad}  dataset {d['path']} manifest {d['manifest_sha256'][:16]}{ok}")
        lines.append(
            f"{pad}    splits: "
            f"{', '.join(f'{k}={v:,}' for k, v in d['splits'].items() if v is not None)}"
        )
        for i in d["inputs"][:20]:
            lines.append(f"{pad}    input ({i['kind']}) {i['path']}  {i['fingerprint']}")
        if len(d["inputs"]) > 20:
            lines.append(f"{pad}    ... and {len(d['inputs']) - 20} more inputs (--json lists all)")
    parent = b.get("parent")
    if parent:
        where = (
            parent.get("registered")
            or parent.get("bundle")
            or parent.get("hf_gpt2")
            or parent.get("uri")
        )
        lines.append(f"{pad}  parent: {where}")
        if parent.get("bundle_facts"):
            _render_bundle(parent["bundle_facts"], lines, pad + "    ")
    teacher = b.get("teacher")
    if teacher:
        where = teacher.get("bundle") or teacher.get("hf_gpt2") or teacher.get("uri")
        how = teacher.get("distillation") or {}
        lines.append(
            f"{pad}  teacher: {where} "
            f"(alpha {how.get('alpha')}, temperature {how.get('temperature')})"
        )
        if teacher.get("bundle_facts"):
            _render_bundle(teacher["bundle_facts"], lines, pad + "    ")
