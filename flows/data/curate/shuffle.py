"""Near-duplicate clusters from LSH band keys: a hash-partitioned shuffle, then connected
components.

What it is, in three steps that never bring signatures to the driver:

1. map (inside each preprocessing work unit, :func:`write_bands`): every document's band keys as
   records ``(key, band, doc)`` -- 18 bytes a record, ``num_bands`` records a document -- sorted by
   partition (``key % partitions``) into one file per unit, with the partitions' bounds;
2. reduce (:func:`bucket_partition`, one Ray task per partition): the partition's slice of every
   unit's file (a memory-mapped read), sorted by (band, key, doc); each run of equal (band, key)
   is a bucket, and each of its documents but the first gets an edge to the first -- a star, so a
   bucket of k documents costs k-1 edges, not k(k-1)/2;
3. components (:func:`components`, one Ray task): the union of the partitions' edges, labelled by
   min-label propagation with pointer jumping (numpy, a few rounds): every document of a component
   takes the smallest document id in it, i.e. the first in input order -- the survivor, the same
   whatever the worker count, so reruns are byte-identical.

A document id is ``unit index << 32 | index in the unit``. What it is not: what a document is or
whether it is good (flows/data/curate/minhash.py makes the keys; the stage decides what to drop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

RECORD = np.dtype([("key", "<u8"), ("band", "<u2"), ("doc", "<u8")])


def doc_id(unit: int, index: np.ndarray | int) -> np.ndarray:
    return (np.uint64(unit) << np.uint64(32)) | np.asarray(index, dtype=np.uint64)


def write_bands(
    f: Any, unit: int, keys: np.ndarray, index: np.ndarray, partitions: int
) -> np.ndarray:
    """Write the records of `keys` ((n, bands) uint64, the documents `index` of `unit`) to the open
    file `f` (``.npy``) sorted by partition; return the partitions' bounds ((partitions + 1,)
    int64)."""
    n, bands = keys.shape if keys.ndim == 2 else (0, 0)
    rec = np.empty(n * bands, dtype=RECORD)
    if n:
        rec["key"] = keys.ravel()
        rec["band"] = np.tile(np.arange(bands, dtype=np.uint16), n)
        rec["doc"] = np.repeat(doc_id(unit, index), bands)
    part = (rec["key"] % np.uint64(partitions)).astype(np.int64)
    order = np.argsort(part, kind="stable")
    np.save(f, rec[order])
    return np.searchsorted(part[order], np.arange(partitions + 1), side="left").astype(np.int64)


def bucket_partition(band_files: list[tuple[str, list[int]]], p: int, out: str) -> dict[str, Any]:
    """Ray task: the edges (doc, first doc of its bucket) of partition `p`, from each unit's band
    file and bounds; written to `out` (``.npy``, (m, 2) uint64, unique, sorted). Memory: the
    partition's records (18 bytes each), about 1/partitions of the corpus's."""
    slices = []
    for path, bounds in band_files:
        rec = np.load(path, mmap_mode="r")
        slices.append(np.asarray(rec[bounds[p] : bounds[p + 1]]))
    rec = np.concatenate(slices) if slices else np.empty(0, dtype=RECORD)
    del slices
    edges = np.empty((0, 2), dtype=np.uint64)
    buckets = 0
    if len(rec):
        order = np.lexsort((rec["doc"], rec["key"], rec["band"]))
        rec = rec[order]
        start = np.ones(len(rec), dtype=bool)
        start[1:] = (rec["key"][1:] != rec["key"][:-1]) | (rec["band"][1:] != rec["band"][:-1])
        first = rec["doc"][np.maximum.accumulate(np.where(start, np.arange(len(rec)), 0))]
        members = ~start
        sizes = np.diff(np.r_[np.flatnonzero(start), len(rec)])
        buckets = int(np.count_nonzero(sizes > 1))  # buckets that hold more than one document
        edges = np.stack([rec["doc"][members], first[members]], axis=1)
        edges = np.unique(edges, axis=0) if len(edges) else edges
    tmp = Path(out).with_suffix(".tmp.npy")
    np.save(tmp, edges)
    tmp.replace(out)
    return {"partition": p, "records": int(len(rec)), "buckets": buckets, "edges": int(len(edges))}


def label_components(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, root of each node): nodes are the sorted unique document ids of `edges`; each
    node's root is the smallest document id of its connected component."""
    if not len(edges):
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)
    nodes, inv = np.unique(edges.ravel(), return_inverse=True)
    u, v = inv.reshape(-1, 2).T
    label = np.arange(len(nodes))
    while True:  # min-label propagation along edges, then pointer jumping; ends when nothing moves
        m = np.minimum(label[u], label[v])
        new = label.copy()
        np.minimum.at(new, u, m)
        np.minimum.at(new, v, m)
        while True:
            jumped = new[new]
            if (jumped == new).all():
                break
            new = jumped
        if (new == label).all():
            return nodes, nodes[label]
        label = new


def components(edge_files: list[str], out: str) -> dict[str, Any]:
    """Ray task: every near-duplicate that is not its cluster's survivor, as (doc, survivor) rows
    sorted by doc in `out` (``.npy``, (d, 2) uint64); and the clusters' sizes as a histogram."""
    parts = [np.load(f) for f in edge_files]
    edges = np.concatenate(parts) if parts else np.empty((0, 2), dtype=np.uint64)
    del parts
    nodes, roots = label_components(edges)
    dropped = nodes != roots
    pairs = (
        np.stack([nodes[dropped], roots[dropped]], axis=1)
        if len(nodes)
        else np.empty((0, 2), np.uint64)
    )
    tmp = Path(out).with_suffix(".tmp.npy")
    np.save(tmp, pairs)
    tmp.replace(out)
    _, sizes = np.unique(roots, return_counts=True)
    size_hist = {int(s): int(c) for s, c in zip(*np.unique(sizes, return_counts=True), strict=True)}
    return {
        "edges": int(len(edges)),
        "clusters": int(len(sizes)),
        "duplicates": int(dropped.sum()),
        "cluster_sizes": size_hist,
    }
