"""Curation in the preprocess driver: what runs between pass 1 and tokenization, and the report.

What it is: :func:`eval_ngrams` (decontamination's n-grams, hashed once into ``_work/`` for the
workers), :func:`duplicates` (which documents exact and near-duplicate removal dropped, and the kept
document of each one's cluster; it clears them from the keep masks) and :func:`finish` (writes
``<dataset>/curation/``: dropped.jsonl, report.json, the PNGs; returns the manifest's entry).

What it is not: per-document logic (apply.py) or the shuffle's tasks (shuffle.py, unit.py). The
driver holds file names, the keep masks the stage already held, and one row per dropped duplicate --
never signatures or band keys.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from flows.config import DataConfig, to_dict
from flows.data.curate import report
from flows.data.curate.unit import SAMPLE_CHARS, near_duplicates
from flows.data.shards import load_index

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Duplicates:
    count: int = 0  # near-duplicates dropped (exact ones are the stage's `duplicate`)
    rows: dict[str, list[tuple[int, str, str, int]]] = dataclasses.field(default_factory=dict)
    shuffle: dict[str, Any] | None = None


def eval_ngrams(data: DataConfig, work: Path) -> str | None:
    """The evaluation files' n-gram hashes as ``_work/decontam.npy`` (None when there are none)."""
    if not data.curate.decontaminate:
        return None
    from flows.data.curate.decontam import load_ngrams

    path = work / "decontam.npy"
    grams = load_ngrams(data.curate.decontaminate, data.curate.decontaminate_ngram)
    np.save(path.with_suffix(".tmp.npy"), grams)
    path.with_suffix(".tmp.npy").replace(path)
    log.info(
        "decontamination: %d %d-grams from %d files",
        len(grams),
        data.curate.decontaminate_ngram,
        len(data.curate.decontaminate),
    )
    return str(path)


def _exact(units: list, work: Path, keep: dict[str, np.ndarray], rows: dict[str, list]) -> None:
    """Rows of the exact duplicates `keep` dropped: each points at the first document with its
    content."""
    hashes = [load_index(work, u.key)[1] for u in units]
    counts = np.array([len(h) for h in hashes])
    h = np.concatenate(hashes).view("<u8")
    del hashes
    order = np.lexsort((h[:, 1], h[:, 0]))
    hs = h[order]
    start = np.ones(len(order), dtype=bool)
    start[1:] = (hs[1:] != hs[:-1]).any(axis=1)
    del hs, h
    first = np.empty(len(order), dtype=np.int64)
    first[order] = order[np.maximum.accumulate(np.where(start, np.arange(len(order)), 0))]
    bounds = np.concatenate([[0], np.cumsum(counts)])
    dropped = np.flatnonzero(~np.concatenate([keep[u.key] for u in units]))
    for g in dropped.tolist():
        ui = int(np.searchsorted(bounds, g, side="right")) - 1
        f = int(first[g])
        fi = int(np.searchsorted(bounds, f, side="right")) - 1
        rows.setdefault(units[ui].key, []).append(
            (g - int(bounds[ui]), "duplicate", units[fi].key, f - int(bounds[fi]))
        )


def duplicates(
    units: list,
    work: Path,
    keep: dict[str, np.ndarray],
    data: DataConfig,
    workers: int,
    meta: dict[str, dict],
    exact: int,
) -> Duplicates:
    """Exact duplicates' rows, then the near-duplicate shuffle: its duplicates leave `keep`."""
    out = Duplicates()
    if exact:
        _exact(units, work, keep, out.rows)
    if data.curate.near_dedup.enabled and units:
        pairs, out.shuffle = near_duplicates(meta, units, work, data, workers)
        out.shuffle["partitions"] = data.curate.near_dedup.partitions
        key_of = {u.index: u.key for u in units}
        mask = np.uint64(0xFFFFFFFF)
        for doc, root in pairs.tolist() if len(pairs) else []:
            key, index = key_of[doc >> 32], doc & int(mask)
            if keep[key][index]:  # an exact duplicate is already counted as one
                keep[key][index] = False
                out.count += 1
                out.rows.setdefault(key, []).append(
                    (index, "near_duplicate", key_of[root >> 32], root & int(mask))
                )
        log.info("near-duplicates: %d dropped in %d clusters", out.count, out.shuffle["clusters"])
    for r in out.rows.values():
        r.sort()
    return out


def _texts(work: Path, key: str, indices: list[int]) -> list[str]:
    offsets, _ = load_index(work, key)
    out = []
    with open(work / "clean" / f"{key}.txt", "rb") as f:
        for i in indices:
            f.seek(int(offsets[i]))
            out.append(
                f.read(min(int(offsets[i + 1] - offsets[i]), 4 * SAMPLE_CHARS)).decode(
                    "utf-8", errors="ignore"
                )[:SAMPLE_CHARS]
            )
    return out


def finish(
    out: Path,
    units: list,
    work: Path,
    data: DataConfig,
    meta: dict[str, dict],
    dups: Duplicates,
    kept: int,
    kept_tokens: int,
    kept_bytes: int,
) -> dict[str, Any]:
    """Write ``<out>/curation/`` and return the manifest's ``curation`` entry."""
    (out / report.DIR).mkdir(exist_ok=True)
    keys = [u.key for u in units]
    where = report.Locations(work, meta)
    report.write_dropped(out, keys, work, dups.rows, where)
    cur = [meta[k]["curation"] for k in keys]
    per_token = kept_tokens / kept_bytes if kept_bytes else 0.0
    counts: dict[str, int] = report.merge_counts(meta[k]["dropped"] for k in keys)
    sizes: dict[str, int] = report.merge_counts(c["dropped_bytes"] for c in cur)
    samples: dict[str, list[Any]] = {}
    for c in cur:
        for reason, texts in c["samples"].items():
            first = samples.setdefault(reason, [])
            first += texts[: data.curate.samples_per_reason - len(first)]
    for key, rows in dups.rows.items():
        offsets, _ = load_index(work, key)
        for index, reason, _, _ in rows:
            counts[reason] = counts.get(reason, 0) + 1
            sizes[reason] = sizes.get(reason, 0) + int(offsets[index + 1] - offsets[index])
    for key in keys:  # the first few duplicates of each kind, in input order
        for reason in ("duplicate", "near_duplicate"):
            chosen = [r for r in dups.rows.get(key, []) if r[1] == reason]
            room = data.curate.samples_per_reason - len(samples.get(reason, []))
            if room > 0 and chosen:
                texts = _texts(work, key, [r[0] for r in chosen[:room]])
                samples.setdefault(reason, []).extend(
                    {"text": t, "duplicate_of": where(r[2], r[3])}
                    for t, r in zip(texts, chosen, strict=False)
                )
    dropped = {
        r: {"documents": n, "bytes": sizes.get(r, 0), "tokens": round(sizes.get(r, 0) * per_token)}
        for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    }
    figures: dict[str, Any] = {
        "kept": {"documents": kept, "bytes": kept_bytes, "tokens": kept_tokens},
        "dropped": dropped,
        "tokens_note": "dropped tokens are estimated from the kept text's tokens per byte",
        "pii_mode": data.curate.pii,
        "pii": report.merge_counts(c["pii"] for c in cur),
        "languages": report.merge_counts(c["languages"] for c in cur),
        "histograms": report.merge_counts(c["histogram"] for c in cur),
        "samples": {k: samples[k] for k in sorted(samples)},
        "config": to_dict(data.curate),
    }
    if dups.shuffle is not None:
        figures["near_dedup"] = {**dups.shuffle, "dropped": dups.count}
    rep = report.write_report(out, figures)
    entry: dict[str, Any] = {
        "report": f"{report.DIR}/report.json",
        "dropped": f"{report.DIR}/dropped.jsonl",
        "pii": rep["pii"],
    }
    if dups.shuffle is not None:
        entry["near_dedup"] = {"clusters": dups.shuffle["clusters"], "duplicates": dups.count}
    return entry
