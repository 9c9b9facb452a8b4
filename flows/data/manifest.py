"""What the preprocess stage reports: the manifest, the drop check, the log summary, the MLflow run.

What it is: :class:`Passes` (what the stage's passes produced) and :func:`build`, which merges the
work units' counts (kept, dropped and repaired by reason, where the first few drops were, worker
memory, CPU and nodes) into the ``manifest.json`` entry of each part -- writing
``<dataset>/curation/`` and copying the knowledge tables on the way --; :func:`check_drops`, which
stops the run when too many records could not be read; :func:`summary` (the log line) and
:func:`log_tracking` (metrics, artifacts and the MLflow dataset).

What it is not: the manifest's reader and its checks (flows/data/dataset.py), nor the passes
(flows/data/stage.py, tasks.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from flows.config import DataConfig, stable_hash, to_dict
from flows.data import knowledge_sources
from flows.data.clean import is_bad_record, merge_locations
from flows.data.curate import driver as curate_stage
from flows.data.dataset import FORMAT_VERSION
from flows.data.inputs import InputError
from flows.data.shards import load_index
from flows.data.sources import Sources
from flows.data.units import WorkUnit
from flows.redact import redact, redact_text, redact_url
from flows.workdir import sha256_file


@dataclasses.dataclass
class Passes:
    """What the stage's passes produced, for the manifest. A `*_meta` holds, per unit key, what
    that unit's task returned (flows/data/tasks.py)."""

    units: list[WorkUnit]  # pretraining text, the knowledge files' units last
    sft_units: list[WorkUnit]  # fine-tuning records, likewise
    workers: int
    clean_meta: dict[str, dict[str, Any]]  # pass 1
    keep: dict[str, np.ndarray]  # per unit, its documents kept: exact and near duplicates dropped
    duplicates: int  # exact duplicates dropped
    near: curate_stage.Duplicates  # near-duplicates dropped, and the rows of every duplicate
    tokenizer: Any  # gptcore.Tokenizer
    dtype: str  # of the token shards
    assignment: dict[str, Any]  # how the val split was chosen (flows/data/splits.py)
    tok_meta: dict[str, dict[str, Any]]  # pass 2, pretraining text
    sft_meta: dict[str, dict[str, Any]]  # pass 2, fine-tuning records
    splits: dict[str, dict[str, Any]]  # the packed shards of each split
    timings: dict[str, float]  # seconds per phase


def build(data: DataConfig, sources: Sources, out: Path, p: Passes) -> dict[str, Any]:
    """The manifest of the dataset the passes wrote to `out`; writes ``out/curation/`` and copies
    the knowledge tables into ``out/knowledge/`` on the way."""
    work = out / "_work"
    kept = sum(int(p.keep[u.key].sum()) for u in p.units)
    for split in ("train", "val"):
        p.splits[split]["documents"] = sum(m["documents"][split] for m in p.tok_meta.values())
    total = p.splits["train"]["tokens"] + p.splits["val"]["tokens"]
    p.assignment["tokens"] = p.splits["val"]["tokens"]
    p.assignment["fraction"] = round(p.splits["val"]["tokens"] / total, 6) if total else 0.0
    kept_bytes = sum(int(np.diff(load_index(work, u.key)[0])[p.keep[u.key]].sum()) for u in p.units)
    curation = curate_stage.finish(
        out, p.units, work, data, p.clean_meta, p.near, kept, total, kept_bytes
    )
    documents, sft_examples = _counts(sources, p, kept)
    knowledge_entry = _copy_knowledge(sources, out)
    tok = p.tokenizer
    return {
        "curation": curation,
        "format_version": FORMAT_VERSION,
        "dtype": p.dtype,
        "tokenizer_sha256": sha256_file(out / "tokenizer.json"),
        **(
            {
                "base_model": {
                    "bundle": str(sources.base.bundle),
                    "tokenizer_sha256": tok.sha256(),
                    "chat_template": tok.chat_template is not None,
                    "context_length": sources.base.context_length,
                }
            }
            if sources.base
            else {}
        ),
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "pad_id": tok.pad_id,
        # Input URLs without their credentials (the fingerprints hash the full URLs).
        "config": redact(to_dict(data)),
        "inputs": _inputs(data, sources),
        "documents": documents,
        "sft_examples": sft_examples,
        "splits": p.splits,
        "val_assignment": p.assignment,
        **({"knowledge": knowledge_entry} if knowledge_entry else {}),
        "work_units": {"text": len(p.units), "sft": len(p.sft_units), "workers": p.workers},
        "stats": _worker_stats(p),
    }


def _counts(sources: Sources, p: Passes, kept: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's ``documents`` and ``sft_examples``: kept, dropped and repaired by reason, and
    where the first few drops of each reason were."""
    dropped: Counter = Counter(sources.skipped)
    repaired: Counter = Counter()
    for m in p.clean_meta.values():
        dropped.update(m["dropped"])
        repaired.update(m["repaired"])
    if p.duplicates:
        dropped["duplicate"] += p.duplicates
    if p.near.count:
        dropped["near_duplicate"] += p.near.count
    sft_dropped: Counter = Counter()
    for m in p.sft_meta.values():
        sft_dropped.update(m["dropped"])
        repaired.update(m["repaired"])
    return (
        {
            "kept": kept,
            "dropped": dict(sorted(dropped.items())),
            "repaired": dict(sorted(repaired.items())),
            "locations": _locations(p.clean_meta),
        },
        {
            "kept": p.splits["sft"]["examples"] + p.splits["sft_val"]["examples"],
            "dropped": dict(sorted(sft_dropped.items())),
            "locations": _locations(p.sft_meta),
        },
    )


def _locations(metas: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Where the first few drops of each reason were, in input order (units finish in any order)."""
    into: dict[str, list[dict[str, Any]]] = {}
    for key in sorted(metas):
        merge_locations(into, metas[key].get("locations", {}))
    return dict(sorted(into.items()))


def _worker_stats(p: Passes) -> dict[str, Any]:
    """Seconds per phase, and the workers' peak memory, CPU seconds per pass and nodes."""
    metas = (*p.clean_meta.values(), *p.tok_meta.values(), *p.sft_meta.values())
    peak = max([m["peak_rss_mb"] for m in metas] or [0])
    # Which Ray nodes did the work (units per node id): on a cluster, more than one.
    nodes = dict(
        sorted(
            Counter(
                m["node_id"]
                for m in (*p.clean_meta.values(), *p.tok_meta.values())
                if m.get("node_id")
            ).items()
        )
    )
    cpu = {
        name: round(sum(m.get("cpu_s", 0.0) for m in metas.values()), 3)
        for name, metas in (("clean", p.clean_meta), ("tokenize", p.tok_meta))
    }
    return {
        "seconds": {k: round(v, 3) for k, v in p.timings.items()},
        "worker_peak_rss_mb": peak,
        "worker_cpu_seconds": cpu,
        "worker_nodes": nodes,
    }


def _inputs(data: DataConfig, sources: Sources) -> list[dict[str, Any]]:
    """The manifest's inputs: where each was (no credentials) and its fingerprint."""
    files = [(f, "text") for f in sources.text] + [(f, "sft") for f in sources.sft]
    return [
        {"path": redact_url(f.path), "fingerprint": f.fingerprint, "kind": kind}
        for f, kind in files
    ] + _knowledge_inputs(data, sources)


def _knowledge_inputs(data: DataConfig, sources: Sources) -> list[dict[str, Any]]:
    """The manifest's entries for the knowledge sources: where (no credentials) and their
    content."""
    if sources.knowledge is None:
        return []
    return [
        {
            "path": knowledge_sources.label(s),
            "fingerprint": stable_hash(p, length=32),
            "kind": "knowledge",
            "content": p,
        }
        for s, p in zip(data.knowledge, sources.knowledge.fingerprints, strict=True)
    ]


def _copy_knowledge(sources: Sources, out: Path) -> dict[str, Any] | None:
    """The facts and questions tables into the dataset (evaluation and serving read them there)."""
    if sources.knowledge is None:
        return None
    (out / "knowledge").mkdir(exist_ok=True)
    for table in sources.knowledge.tables:
        shutil.copyfile(table, out / "knowledge" / table.name)
    return {
        "sources": sources.knowledge.summary,
        "facts": "knowledge/facts.jsonl",
        "questions": "knowledge/questions.jsonl",
    }


def check_drops(metas: dict[str, dict[str, Any]], kept: str, key: str, limit: float) -> None:
    """Fail (InputError naming the worst files) when more than `limit` of the records the work units
    read were dropped for a bad-record reason (clean.is_bad_record): a truncated archive, a file
    still being written, a broken export. `kept` names a unit's count of records kept ("documents",
    "examples"). The units' files stay: a rerun with a higher limit resumes from them."""
    bad: Counter = Counter()
    files: dict[str, Counter] = {}
    seen = 0
    for m in metas.values():
        seen += m[kept] + sum(m["dropped"].values())
        bad.update({r: n for r, n in m["dropped"].items() if is_bad_record(r)})
        for path, reasons in m.get("bad_files", {}).items():
            files.setdefault(path, Counter()).update(reasons)
    total = sum(bad.values())
    if not total or total <= limit * seen:
        return
    worst = sorted(files.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:3]
    where = (
        f"worst files: {'; '.join(f'{path}: {_listed(c)}' for path, c in worst)}"
        if worst
        else _listed(bad)
    )
    more = f" (+{len(files) - len(worst)} more files)" if len(files) > len(worst) else ""
    raise InputError(
        f"{key}: {total} of {seen} records ({total / seen:.1%}) could not be read, more than "
        f"data.max_drop_fraction={limit:g} allows; {where}{more}. Fix or remove them (a file "
        "still being written? a truncated download?), or raise data.max_drop_fraction"
    )


def _listed(c: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(c.items()))


def summary(manifest: dict[str, Any], out: Path, seconds: float) -> str:
    """What the stage logs when done: documents kept and dropped, tokens and shards per split."""
    docs = manifest["documents"]
    dropped = ", ".join(f"{k}={v}" for k, v in docs["dropped"].items()) or "none"
    repaired = ", ".join(f"{k}={v}" for k, v in docs.get("repaired", {}).items()) or "none"
    splits = "; ".join(
        f"{name}: {e['tokens']:,} tokens in {len(e['shards'])} shards"
        for name, e in manifest["splits"].items()
    )
    curation = ""
    if (out / "curation" / "report.json").is_file():
        from flows.data.curate.report import table

        curation = "\n" + table(
            json.loads((out / "curation" / "report.json").read_text()), out / "curation"
        )
    return (
        f"preprocess done in {seconds:.1f} s -> {out}{curation}\n"
        f"  documents kept {docs['kept']:,}; dropped: {dropped}; repaired: {repaired}\n"
        f"  {splits} ({manifest['dtype']}, vocab {manifest['vocab_size']})"
    )


def log_tracking(
    tracker: Any, out: Path, manifest: dict[str, Any], sources: Sources, seconds: float
) -> None:
    """The run's metrics (counts, tokens, seconds, curation figures), the manifest, curation report
    and tokenizer as artifacts, and the inputs as the MLflow dataset."""
    docs = manifest["documents"]
    metrics: dict[str, float] = {"documents.kept": docs["kept"], "seconds": seconds}
    metrics.update({f"documents.dropped.{k}": v for k, v in docs["dropped"].items()})
    metrics.update({f"documents.repaired.{k}": v for k, v in docs.get("repaired", {}).items()})
    metrics.update(
        {
            f"sft_examples.dropped.{k}": v
            for k, v in manifest.get("sft_examples", {}).get("dropped", {}).items()
        }
    )
    for split, entry in manifest["splits"].items():
        metrics[f"tokens.{split}"] = entry["tokens"]
        metrics[f"shards.{split}"] = len(entry["shards"])
    total = sum(e["tokens"] for e in manifest["splits"].values())
    if "fraction" in manifest.get("val_assignment", {}):
        metrics["val.fraction"] = manifest["val_assignment"]["fraction"]
    if seconds > 0:
        metrics["tokens_per_s"] = total / seconds
    stats = manifest.get("stats", {})
    if stats.get("worker_peak_rss_mb"):
        metrics["worker_peak_rss_mb"] = stats["worker_peak_rss_mb"]
    metrics.update({f"seconds.{k}": v for k, v in stats.get("seconds", {}).items()})
    curation = manifest.get("curation", {})
    metrics.update({f"curation.pii.{k}": v for k, v in curation.get("pii", {}).items()})
    if "near_dedup" in curation:
        metrics["curation.near_dedup.clusters"] = curation["near_dedup"]["clusters"]
    tracker.log_metrics(metrics)
    tracker.log_artifact(out / "manifest.json")
    for name in ("report.json", "quality_scores.png", "near_dup_clusters.png"):
        if (out / "curation" / name).is_file():
            tracker.log_artifact(out / "curation" / name, "curation")
    tracker.log_artifact(out / "tokenizer.json")
    files = manifest["inputs"]
    tracker.log_input_dataset(
        name=redact_text(", ".join(sources.labels))[:200] or "corpus",
        source=files[0]["path"] if len(files) == 1 else str(Path(files[0]["path"]).parent),
        digest=stable_hash([f["fingerprint"] for f in files], length=32),
        context="preprocess",
        profile={"files": len(files), "documents": docs["kept"], "tokens": total},
    )
