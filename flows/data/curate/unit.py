"""Curation inside one preprocessing work unit (a Ray task of pass 1), and the near-dup step after
it.

What it is: :class:`UnitCuration` -- made by ``clean_unit`` for its unit -- runs the configured
per-document chain (flows/data/curate/apply.py) on each cleaned document, remembers where every
kept document came from (file, line or byte offset), writes every drop's location and reason to the
unit's ``.dropped.jsonl`` (the readers' bad-record drops too), computes each kept document's LSH
band keys and writes them partitioned for the shuffle; its :meth:`finish` gives the unit's figures
(counts, characters, PII kinds, score histograms, a few dropped texts per reason).
:func:`near_duplicates` runs the shuffle (flows/data/curate/shuffle.py) as Ray tasks over the
units' band files and returns the (document, survivor) rows.

What it is not: the driver's bookkeeping of the dataset (flows/data/stage.py) or the report
(report.py).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from flows.config import DataConfig
from flows.data.clean import UnitStats
from flows.data.curate import pii
from flows.data.curate.apply import Curator, Histogram
from flows.data.curate.minhash import MinHasher
from flows.data.curate.shuffle import write_bands

SAMPLE_CHARS = 600  # characters of each dropped document the report shows

_CURATORS: dict[str, Curator] = {}  # per worker process, by decontamination file


def curator(data: DataConfig, eval_path: str | None) -> Curator:
    key = f"{hash(data.curate)}:{eval_path}"
    if key not in _CURATORS:
        grams = np.load(eval_path) if eval_path else None
        _CURATORS.clear()
        _CURATORS[key] = Curator(data.curate, grams)
    return _CURATORS[key]


class UnitCuration:
    def __init__(
        self,
        data: DataConfig,
        unit_index: int,
        stats: UnitStats,
        eval_path: str | None,
        dropped_file: Any,
    ) -> None:
        self.cfg = data.curate
        self.curator = curator(data, eval_path)
        nd = data.curate.near_dedup
        self.hasher = (
            MinHasher(nd.num_bands, nd.rows_per_band, nd.ngram, nd.seed) if nd.enabled else None
        )
        self.unit, self.stats = unit_index, stats
        self.files: list[str] = []
        self.loc_file, self.loc_line, self.loc_offset = [], [], []
        self.keys: list[np.ndarray] = []
        self.keyed: list[int] = []
        self.hist = Histogram()
        self.languages: Counter = Counter()
        self.pii: Counter = Counter()
        self.bytes: Counter = Counter()  # UTF-8 bytes dropped, by reason
        self.samples: dict[str, list[str]] = {}
        self._dropped = dropped_file
        self._extra: dict[str, Any] = {}  # fields for the next dropped.jsonl row
        stats.every = self._log_drop  # the readers' drops too

    def _log_drop(self, reason: str, where: dict[str, Any]) -> None:
        row = {**where, "reason": reason, **self._extra}
        self._extra = {}
        self._dropped.write((json.dumps(row, sort_keys=True) + "\n").encode())

    def apply(self, body: str) -> str | None:
        """The document to keep (PII redacted, C4's lines removed), or None (dropped and logged)."""
        if not self.curator.active:
            return body
        v = self.curator.apply(body)
        if v.scores:
            self.hist.add(v.scores)
        self.pii.update(v.pii)
        if v.reason is not None:
            if "language_score" in v.scores:  # the language ID's verdict goes into dropped.jsonl
                self._extra = {
                    "language": v.language,
                    "language_score": round(v.scores["language_score"], 3),
                }
            self.stats.drop(v.reason)
            self.bytes[v.reason] += len(body.encode("utf-8"))
            first = self.samples.setdefault(v.reason, [])
            if len(first) < self.cfg.samples_per_reason:
                # Redacted whatever data.curate.pii says: the report is no place for personal data.
                first.append(pii.redact(body)[0][:SAMPLE_CHARS])  # redact first: no half address
            return None
        if v.language:
            self.languages[v.language] += 1
        return v.text

    def kept(self, index: int, text: str) -> None:
        """Document `index` of the unit was kept: remember where it was read and its band keys."""
        s = self.stats
        if not self.files or self.files[-1] != s.file:
            self.files.append(s.file or "")
        self.loc_file.append(len(self.files) - 1)
        self.loc_line.append(s.line or 0)
        self.loc_offset.append(-1 if s.offset is None else s.offset)
        if self.hasher is not None and (keys := self.hasher.band_keys(text)) is not None:
            self.keys.append(keys)
            self.keyed.append(index)

    def write(self, locations: Any, bands: Any, partitions: int) -> dict[str, Any]:
        """Write the locations (``.npz``) and band records (``.bands.npy``); the unit's figures."""
        np.savez(
            locations,
            source=np.asarray(self.loc_file, dtype=np.int32),
            line=np.asarray(self.loc_line, dtype=np.int64),
            offset=np.asarray(self.loc_offset, dtype=np.int64),
        )
        bounds = None
        if bands is not None:
            keys = np.stack(self.keys) if self.keys else np.zeros((0, 0), dtype=np.uint64)
            bounds = write_bands(
                bands, self.unit, keys, np.asarray(self.keyed, dtype=np.int64), partitions
            )
        return {
            "files": self.files,
            "band_bounds": None if bounds is None else bounds.tolist(),
            "histogram": self.hist.to_dict(),
            "languages": dict(self.languages),
            "pii": dict(self.pii),
            "dropped_bytes": dict(self.bytes),
            "samples": self.samples,
        }


def near_duplicates(
    meta: dict[str, dict], units: list, work: Path, data: DataConfig, workers: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """(doc, survivor) rows of every near-duplicate that is not its cluster's first document,
    sorted by doc; and the shuffle's figures. Runs ``partitions`` bucket tasks, then one
    components task: the driver sees only file names and the duplicates."""
    import ray

    from flows.data.curate.shuffle import bucket_partition, components

    nd = data.curate.near_dedup
    lsh = work / "lsh"
    lsh.mkdir(exist_ok=True)
    band_files = [
        (str(work / "clean" / f"{u.key}.bands.npy"), meta[u.key]["curation"]["band_bounds"])
        for u in units
    ]
    bucket = ray.remote(bucket_partition).options(
        num_cpus=1, max_retries=2, scheduling_strategy="SPREAD"
    )
    refs, figures = [], []
    for p in range(nd.partitions):  # at most `workers` at once, like the work units
        if len(refs) >= workers:
            done, refs = ray.wait(refs, num_returns=1)
            figures += ray.get(done)
        refs.append(bucket.remote(band_files, p, str(lsh / f"{p:05d}.edges.npy")))
    figures += ray.get(refs)
    edge_files = [str(lsh / f"{p:05d}.edges.npy") for p in range(nd.partitions)]
    out = str(lsh / "duplicates.npy")
    comp = ray.get(
        ray.remote(components).options(num_cpus=1, max_retries=2).remote(edge_files, out)
    )
    pairs = np.load(out)
    comp["records"] = sum(f["records"] for f in figures)
    comp["buckets"] = sum(f["buckets"] for f in figures)
    comp["largest_partition_records"] = max((f["records"] for f in figures), default=0)
    return pairs, comp
