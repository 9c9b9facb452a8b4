"""Training data: checks a dataset directory, and reads deterministic batches from its token shards.

What it is: the reader side of the dataset-directory contract (``manifest.json``, ``tokenizer.json``,
flat little-endian token shards, uint8 loss-mask files for the ``sft`` split). The driver calls
:func:`check_dataset` before any worker starts; each worker opens a :class:`TokenWindows` and asks
for the batch of a (step, micro-batch) -- a pure function of (seed, step, rank), so a resumed run sees
exactly the batches an uninterrupted run would.

What it is not: preprocessing (flows/preprocess.py writes these directories), nor a general
data-loading framework. Sequences are fixed windows of ``context_length + 1`` tokens laid end to end
over each shard (documents are packed; ``<|endoftext|>`` separates them), dealt round-robin to ranks,
so the ranks read disjoint windows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flows.outputs import sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class DataError(ValueError):
    """A dataset directory that training cannot use; the message names the file and what is wrong."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the driver learned about a dataset directory while checking it (all JSON-serialisable)."""

    path: str
    manifest_sha256: str
    tokenizer_sha256: str
    vocab_size: int
    eot_id: int
    pad_id: int
    dtype: str
    split_tokens: dict[str, int]


def read_manifest(dataset: str | Path, splits: tuple[str, ...] | None = None,
                  verify: bool = False) -> dict[str, Any]:
    """The manifest of a finished dataset directory, after checking that every shard (and mask file)
    of `splits` (default: all) exists with its recorded size and, with verify=True, its sha256.

    Raises :class:`DataError` naming the file. Hashing reads every byte once (about 1 GB/s); it is the
    price of never training on a half-copied shard.
    """
    root = Path(dataset)
    path = root / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; is {dataset} a dataset directory written by `gptflow preprocess`?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    for key in ("format_version", "dtype", "vocab_size", "eot_id", "splits"):
        if key not in manifest:
            raise DataError(f"{path}: key {key!r} is missing")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(f"{path}: format_version={manifest['format_version']!r}, this reader knows {FORMAT_VERSION}")
    if manifest["dtype"] not in _DTYPES:
        raise DataError(f"{path}: dtype={manifest['dtype']!r} must be one of {', '.join(_DTYPES)}")
    tok_path = root / "tokenizer.json"
    if not tok_path.is_file():
        raise DataError(f"{tok_path}: missing (the dataset's tokenizer)")
    if verify and manifest.get("tokenizer_sha256") and sha256_file(tok_path) != manifest["tokenizer_sha256"]:
        raise DataError(f"{tok_path}: sha256 does not match {path}")
    itemsize = np.dtype(_DTYPES[manifest["dtype"]]).itemsize
    for split in splits if splits is not None else tuple(manifest["splits"]):
        for shard in (manifest["splits"].get(split) or {}).get("shards", []):
            files = [(shard["file"], shard.get("sha256"), shard["tokens"] * itemsize)]
            if split == "sft" and "mask_file" not in shard:
                raise DataError(f"{path}: sft shard {shard['file']} has no mask_file")
            if "mask_file" in shard:
                files.append((shard["mask_file"], shard.get("mask_sha256"), shard["tokens"]))
            for name, digest, size in files:
                f = root / name
                if not f.is_file():
                    raise DataError(f"{f}: shard listed in {path} is missing ({split} split)")
                if f.stat().st_size != size:
                    raise DataError(f"{f}: {f.stat().st_size} bytes, manifest says {size} ({path})")
                if verify and digest and sha256_file(f) != digest:
                    raise DataError(f"{f}: sha256 does not match {path} (corrupt or partly copied shard)")
    return manifest


def check_dataset(dataset: str | Path, splits: tuple[str, ...], context_length: int,
                  verify_hashes: bool = True, world: int = 1) -> DatasetInfo:
    """Every shard of `splits` is intact (see :func:`read_manifest`) and gives each of `world` ranks
    at least one window of ``context_length + 1`` tokens. Raises :class:`DataError` naming the file.
    """
    root = Path(dataset)
    manifest = read_manifest(root, splits, verify=verify_hashes)
    mpath = root / "manifest.json"
    split_tokens: dict[str, int] = {}
    for split in splits:
        entry = manifest["splits"].get(split)
        if not entry or not entry.get("shards"):
            have = ", ".join(s for s, e in manifest["splits"].items() if e and e.get("shards")) or "none"
            raise DataError(f"{mpath}: split {split!r} has no shards (splits with data: {have})")
        # A window is context_length + 1 tokens (inputs plus the shifted targets) inside one shard.
        longest = max(s["tokens"] for s in entry["shards"])
        if longest < context_length + 1:
            raise DataError(
                f"{mpath}: split {split!r} cannot fill context_length={context_length}: its longest shard "
                f"has {longest} tokens, a sequence needs {context_length + 1}; lower model.context_length"
            )
        windows = sum((s["tokens"] - 1) // context_length for s in entry["shards"])
        if windows < world:
            raise DataError(
                f"{mpath}: split {split!r} holds {windows} sequences of {context_length + 1} tokens, fewer than "
                f"the {world} workers that each need one; use fewer workers or a shorter context_length"
            )
        split_tokens[split] = sum(s["tokens"] for s in entry["shards"])
    return DatasetInfo(
        path=str(root.resolve()), manifest_sha256=sha256_file(mpath),
        tokenizer_sha256=manifest.get("tokenizer_sha256") or sha256_file(root / "tokenizer.json"),
        vocab_size=int(manifest["vocab_size"]), eot_id=int(manifest["eot_id"]),
        pad_id=int(manifest.get("pad_id", -1)), dtype=manifest["dtype"], split_tokens=split_tokens,
    )


class TokenWindows:
    """The windows of one split that belong to one rank, and deterministic batches drawn from them.

    Window ``w`` of a shard covers tokens ``[w*T, w*T + T + 1)``; the windows of all shards are
    numbered in manifest order and rank ``r`` of ``world`` owns those with ``index % world == r``. On
    the ``sft`` split, windows whose targets carry no loss-mask bit are dropped (they would give an
    empty loss).
    """

    def __init__(self, dataset: str | Path, split: str, context_length: int, rank: int = 0, world: int = 1):
        root = Path(dataset)
        manifest = read_manifest(root)
        dtype = _DTYPES[manifest["dtype"]]
        self.T = context_length
        self.split = split
        self.masked = split == "sft"
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray | None] = []
        owned: list[tuple[int, int]] = []  # (shard index, window start)
        index = 0
        for si, shard in enumerate(manifest["splits"][split]["shards"]):
            toks = np.memmap(root / shard["file"], dtype=dtype, mode="r")
            mask = np.memmap(root / shard["mask_file"], dtype=np.uint8, mode="r") if self.masked else None
            self._tokens.append(toks)
            self._masks.append(mask)
            n = (len(toks) - 1) // self.T
            for w in range(n):
                if index % world == rank and (mask is None or mask[w * self.T + 1 : w * self.T + self.T + 1].any()):
                    owned.append((si, w * self.T))
                index += 1
        if not owned:
            raise DataError(f"{root}: split {split!r} has no {context_length + 1}-token window for rank {rank} of {world}")
        self._owned = np.asarray(owned, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._owned)

    def window_ids(self, seed: int, start: int, count: int) -> np.ndarray:
        """Indices (into this rank's windows) of samples ``start .. start+count-1`` of an endless stream.

        The stream walks a fresh permutation of the windows per epoch; sample ``c`` is a function of
        (seed, rank's windows, c) alone, which is what makes resumption exact.
        """
        n = len(self._owned)
        out = np.empty(count, dtype=np.int64)
        perms: dict[int, np.ndarray] = {}
        for i in range(count):
            c = start + i
            epoch = c // n
            if epoch not in perms:
                perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
            out[i] = perms[epoch][c % n]
        return out

    def batch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(inputs, targets, loss_mask or None) as int64/bool arrays of shape (len(ids), T)."""
        x = np.empty((len(ids), self.T + 1), dtype=np.int64)
        m = np.empty((len(ids), self.T + 1), dtype=bool) if self.masked else None
        for row, wid in enumerate(ids):
            si, start = self._owned[wid]
            x[row] = self._tokens[si][start : start + self.T + 1]
            if m is not None:
                m[row] = self._masks[si][start : start + self.T + 1]
        # The mask marks tokens to learn; a target at position t is token t+1, hence the shift.
        return x[:, :-1], x[:, 1:], (m[:, 1:] if m is not None else None)

    def train_batch(self, seed: int, step: int, micro: int, grad_accum: int, micro_batch_size: int):
        """The batch of micro-batch `micro` of optimizer step `step` (steps count from 0)."""
        start = (step * grad_accum + micro) * micro_batch_size
        return self.batch(self.window_ids(seed, start, micro_batch_size))

    def eval_batches(self, num_batches: int, micro_batch_size: int, limit: int | None = None):
        """The first windows of this rank in order: the same validation set at every evaluation.

        `limit` caps the windows; pass the minimum over ranks so every rank runs the same number of
        forwards (under ZeRO-3 each forward is a collective, and unequal counts hang).
        """
        total = min(len(self), num_batches * micro_batch_size, limit if limit is not None else len(self))
        for i in range(0, total, micro_batch_size):
            yield self.batch(np.arange(i, min(i + micro_batch_size, total)))
