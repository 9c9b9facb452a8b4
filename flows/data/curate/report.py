"""The curation report of a dataset: ``<dataset>/curation/`` and the table `gptflow preprocess`
prints.

What it is: :func:`write_dropped` (``dropped.jsonl``: every dropped document's file, 1-based line
and/or byte offset, reason, and for duplicates ``duplicate_of``, the kept document of their
cluster), :func:`write_report` (``report.json`` -- kept and dropped documents, characters and
estimated tokens per reason, PII counts, languages, near-duplicate clusters, score histograms, a
few dropped documents per reason -- and the PNG histograms ``quality_scores.png`` and
``near_dup_clusters.png``) and :func:`table` (the summary as text). Everything is written in a fixed
order from the units' files, so a rerun writes the same bytes.

What it is not: the filters (apply.py and friends) or the shuffle (shuffle.py).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from flows.data.curate.apply import SCORES
from flows.workdir import atomic_write_text

DIR = "curation"


class Locations:
    """Where each kept document of each unit was read (file, line, offset), loaded on demand."""

    def __init__(self, work: Path, meta: dict[str, dict]) -> None:
        self.work, self.meta = work, meta
        self._cache: dict[str, Any] = {}

    def __call__(self, key: str, index: int) -> dict[str, Any]:
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            with np.load(self.work / "clean" / f"{key}.loc.npz") as z:
                self._cache[key] = (z["source"], z["line"], z["offset"])
        f, line, offset = self._cache[key]
        where: dict[str, Any] = {"file": self.meta[key]["curation"]["files"][int(f[index])]}
        if line[index] > 0:
            where["line"] = int(line[index])
        if offset[index] >= 0:
            where["offset"] = int(offset[index])
        return where


def write_dropped(
    out: Path,
    keys: list[str],
    work: Path,
    duplicates: dict[str, list[tuple[int, str, str, int]]],
    where: Locations,
) -> None:
    """``dropped.jsonl``: per unit in order, the unit's own drops (as read), then its duplicates
    (rows (index, reason, survivor's unit key, survivor's index), in document order)."""
    path = out / DIR / "dropped.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "wb") as f:
        for key in keys:
            with open(work / "clean" / f"{key}.dropped.jsonl", "rb") as src:
                shutil.copyfileobj(src, f)
            for index, reason, skey, sindex in duplicates.get(key, []):
                row = {**where(key, index), "reason": reason, "duplicate_of": where(skey, sindex)}
                f.write((json.dumps(row, sort_keys=True) + "\n").encode())
    tmp.replace(path)


def merge_counts(dicts: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The work units' counts summed per key, sorted by key (lists, such as histograms,
    element-wise)."""
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, list):
                mine = out.setdefault(k, [0] * len(v))
                for i, c in enumerate(v):
                    mine[i] += c
            else:
                out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def write_report(out: Path, figures: dict[str, Any]) -> dict[str, Any]:
    """``report.json`` and the PNG histograms from the stage's `figures`; returns the report."""
    cur = out / DIR
    report = {k: figures[k] for k in sorted(figures)}
    atomic_write_text(cur / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    if report.get("histograms"):
        _plot_scores(report["histograms"], cur / "quality_scores.png")
    if report.get("near_dedup", {}).get("cluster_sizes") is not None:
        _plot_clusters(report["near_dedup"]["cluster_sizes"], cur / "near_dup_clusters.png")
    return report


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    return Figure(figsize=(width, height), dpi=80)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    # Fixed metadata: matplotlib stamps its version and, unless told, nothing else; reruns are
    # identical.
    fig.savefig(tmp, format="png", metadata={"Software": None})
    tmp.replace(path)


def _plot_scores(hist: dict[str, list[int]], path: Path) -> None:
    names = [s for s in SCORES if s[0] in hist]
    cols = 4
    rows = (len(names) + cols - 1) // cols
    fig = _figure(3.2 * cols, 2.4 * rows)
    for i, (name, lo, hi, bins) in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        edges = np.linspace(lo, hi, bins + 1)
        ax.bar(edges[:-1], hist[name], width=(hi - lo) / bins, align="edge", color="#4c72b0")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("curation: quality scores of the documents scored (counts per bin)", fontsize=10)
    _save(fig, path)


def _plot_clusters(sizes: dict[str, int], path: Path) -> None:
    fig = _figure(5, 3)
    ax = fig.add_subplot(1, 1, 1)
    if sizes:
        xs = sorted(int(k) for k in sizes)
        ax.bar(
            [str(x) for x in xs], [sizes.get(str(x), sizes.get(x, 0)) for x in xs], color="#dd8452"
        )
    else:
        ax.text(
            0.5, 0.5, "no near-duplicate clusters", ha="center", va="center", transform=ax.transAxes
        )
    ax.set_xlabel("documents in the cluster")
    ax.set_ylabel("clusters")
    ax.set_title("near-duplicate cluster sizes", fontsize=10)
    _save(fig, path)


def _human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{int(n)}"


def table(report: dict[str, Any], path: Path | None = None) -> str:
    """The curation summary: documents, characters and (estimated) tokens kept and per reason."""
    lines = [
        f"curation ({path}):" if path else "curation:",
        f"  {'':24s} {'documents':>10s} {'bytes':>9s} {'tokens':>9s}",
    ]
    k = report["kept"]
    lines.append(
        f"  {'kept':24s} {k['documents']:>10,d} {_human(k['bytes']):>9s} {_human(k['tokens']):>9s}"
    )
    for reason, d in report["dropped"].items():
        lines.append(
            f"  {'dropped: ' + reason:24s} {d['documents']:>10,d} {_human(d['bytes']):>9s} "
            f"{'~' + _human(d['tokens']):>9s}"
        )
    if report.get("pii"):
        kinds = ", ".join(f"{k} {v:,}" for k, v in report["pii"].items())
        lines.append(f"  PII {report['pii_mode']}: {kinds}")
    nd = report.get("near_dedup")
    if nd:
        lines.append(
            f"  near-duplicate clusters: {nd['clusters']:,} ({nd['dropped']:,} dropped beyond "
            f"exact copies; {nd['records']:,} band records in {nd['partitions']} partitions)"
        )
    return "\n".join(lines)
