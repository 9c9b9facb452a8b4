"""Preprocessing files: per-unit files (written, and read back by the driver) and the packed token
shards of the dataset.

What it is: :class:`UnitWriter` (a work unit's files under temporary names, renamed together, its
``.json`` last so a killed run resumes with the units it finished) and the packers that concatenate
per-unit token files in unit order into ``<split>/NNNNN.bin`` shards (with loss-mask files for
fine-tuning splits), each renamed into place when full, with its sha256 for the manifest.

What it is not: the manifest reader (flows/data/dataset.py) or the stage (flows/data/stage.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from flows.workdir import atomic_write_text, fsync_dir, fsync_file, tmp_suffix


class UnitWriter:
    """Files of one work unit, written under temporary names and renamed together by commit()."""

    def __init__(self, directory: Path, key: str):
        self.dir = directory
        self.key = key
        self._tmp: dict[str, Path] = {}
        self._files: dict[str, Any] = {}

    def open(self, suffix: str) -> Any:
        tmp = self.dir / f".{self.key}{suffix}.{tmp_suffix()}"
        self._tmp[suffix] = tmp
        self._files[suffix] = open(tmp, "wb")
        return self._files[suffix]

    def commit(self, meta: dict[str, Any]) -> dict[str, Any]:
        """fsync and rename the files, fsync the directory, then write the ``.json`` that says
        "done": after a crash a unit either has all its files, complete, or no ``.json`` (and is
        redone)."""
        for f in self._files.values():
            fsync_file(f)
            f.close()
        for suffix, tmp in self._tmp.items():
            os.replace(tmp, self.dir / f"{self.key}{suffix}")
        fsync_dir(self.dir)
        atomic_write_text(
            self.dir / f"{self.key}.json", json.dumps(meta, sort_keys=True)
        )  # last: "done"
        return meta


class ShardWriter:
    """Consecutive shard files ``<split>/NNNNN.bin`` (and masks), each renamed into place when
    full."""

    def __init__(
        self, out: Path, split: str, shard_tokens: int, itemsize: int, masked: bool = False
    ):
        self.out, self.split, self.cap, self.itemsize, self.masked = (
            out,
            split,
            shard_tokens,
            itemsize,
            masked,
        )
        (out / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        self._f: Any = None

    def _start(self) -> None:
        name = f"{len(self.shards):05d}"
        self._name = name
        self._tmp = self.out / self.split / f".{name}.bin.{tmp_suffix()}"
        self._f = open(self._tmp, "wb")
        self._h = hashlib.sha256()
        if self.masked:
            self._mtmp = self.out / self.split / f".{name}.mask.bin.{tmp_suffix()}"
            self._mf = open(self._mtmp, "wb")
            self._mh = hashlib.sha256()
        self._tokens = 0
        self._examples = 0

    @property
    def room(self) -> int:
        return self.cap - self._tokens if self._f else self.cap

    def write(self, data: bytes, mask: bytes | None = None, examples: int = 0) -> None:
        if self._f is None:
            self._start()
        self._f.write(data)
        self._h.update(data)
        if self.masked and mask is not None:
            self._mf.write(mask)
            self._mh.update(mask)
        self._tokens += len(data) // self.itemsize
        self._examples += examples

    def close_shard(self) -> None:
        if self._f is None:
            return
        fsync_file(
            self._f
        )  # on disk before its name is: the manifest and DONE that follow trust it
        self._f.close()
        entry: dict[str, Any] = {
            "file": f"{self.split}/{self._name}.bin",
            "tokens": self._tokens,
            "sha256": self._h.hexdigest(),
        }
        os.replace(self._tmp, self.out / entry["file"])
        if self.masked:
            fsync_file(self._mf)
            self._mf.close()
            entry["mask_file"] = f"{self.split}/{self._name}.mask.bin"
            entry["mask_sha256"] = self._mh.hexdigest()
            entry["examples"] = self._examples
            os.replace(self._mtmp, self.out / entry["mask_file"])
        fsync_dir(self.out / self.split)
        self.shards.append(entry)
        self._f = None


def pack_tokens(
    src: Path, names: list[str], out: Path, split: str, dtype: str, shard_tokens: int
) -> dict[str, Any]:
    """Concatenate per-unit token files in unit order, cut into shards of exactly shard_tokens."""
    itemsize = np.dtype(dtype).itemsize
    writer = ShardWriter(out, split, shard_tokens, itemsize)
    for name in names:
        with open(src / name, "rb") as f:
            while True:
                block = f.read(min(writer.room, 1 << 22) * itemsize)
                if not block:
                    break
                writer.write(block)
                if writer.room == 0:
                    writer.close_shard()
    writer.close_shard()
    return {"shards": writer.shards, "tokens": sum(s["tokens"] for s in writer.shards)}


def pack_sft(
    src: Path,
    keys: list[str],
    out: Path,
    split: str,
    dtype: str,
    shard_tokens: int,
    select: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Like pack_tokens, for the fine-tuning split `split` (``sft`` or ``sft_val``) with its loss
    masks: the examples `select` picks per unit (default: all), in unit order; an example never
    spans two shards (a longer one gets a shard to itself)."""
    itemsize = np.dtype(dtype).itemsize
    writer = ShardWriter(out, split, shard_tokens, itemsize, masked=True)
    for key in keys:
        lengths = np.load(src / f"{key}.len.npy")
        chosen = np.ones(len(lengths), dtype=bool) if select is None else select[key]
        with open(src / f"{key}.bin", "rb") as f, open(src / f"{key}.mask.bin", "rb") as m:
            for n, take in zip(lengths.tolist(), chosen.tolist(), strict=True):
                if not take:
                    f.seek(n * itemsize, os.SEEK_CUR)
                    m.seek(n, os.SEEK_CUR)
                    continue
                if writer.room < n and writer.room < shard_tokens:
                    writer.close_shard()
                writer.write(f.read(n * itemsize), m.read(n), examples=1)
    writer.close_shard()
    return {
        "shards": writer.shards,
        "tokens": sum(s["tokens"] for s in writer.shards),
        "examples": sum(s["examples"] for s in writer.shards),
    }


def load_index(work: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(work / "clean" / f"{key}.npz") as z:
        return z["offsets"], z["hashes"]


def load_pieces(work: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(work / "clean" / f"{key}.npz") as z:
        return z["piece_starts"], z["piece_hashes"]
