"""The dataset directory contract: its format version, its one reader and its errors.

What it is: ``FORMAT_VERSION``, :func:`read_manifest` (a finished dataset directory's manifest,
after checking every shard exists with its recorded size and, on request, sha256),
:func:`check_dataset` (the splits training needs can fill its context on every rank),
:func:`read_shard` and :class:`DataError`. Preprocessing writes what this module reads; training
and evaluation read datasets only through it.

What it is not: writing datasets (flows/data/stage.py, shards.py, manifest.py) or batching
(flows/train/windows.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flows.workdir import sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class DataError(ValueError):
    """A dataset directory that training cannot use; the message names the file and what is
    wrong."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the driver learned about a dataset directory while checking it (all
    JSON-serialisable)."""

    path: str
    manifest_sha256: str
    tokenizer_sha256: str
    vocab_size: int
    eot_id: int
    pad_id: int
    dtype: str
    split_tokens: dict[str, int]


def read_manifest(
    dataset: str | Path, splits: tuple[str, ...] | None = None, verify: bool = False
) -> dict[str, Any]:
    """The manifest of a finished dataset directory, after checking that every shard (and mask file)
    of `splits` (default: all) exists with its recorded size and, with verify=True, its sha256.

    Raises :class:`DataError` naming the file. Hashing reads every byte once (about 1 GB/s); it is
    the price of never training on a half-copied shard.
    """
    root = Path(dataset)
    path = root / "manifest.json"
    if not path.is_file():
        raise DataError(
            f"{path}: missing; is {dataset} a dataset directory written by `gptflow preprocess`?"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from e
    _check_schema(manifest, path)
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version={manifest['format_version']!r}, this reader knows "
            f"{FORMAT_VERSION}"
        )
    if manifest["dtype"] not in DTYPES:
        raise DataError(f"{path}: dtype={manifest['dtype']!r} must be one of {', '.join(DTYPES)}")
    tok_path = root / "tokenizer.json"
    if not tok_path.is_file():
        raise DataError(f"{tok_path}: missing (the dataset's tokenizer)")
    if (
        verify
        and manifest.get("tokenizer_sha256")
        and sha256_file(tok_path) != manifest["tokenizer_sha256"]
    ):
        raise DataError(f"{tok_path}: sha256 does not match {path}")
    itemsize = np.dtype(DTYPES[manifest["dtype"]]).itemsize
    for split in splits if splits is not None else tuple(manifest["splits"]):
        for shard in (manifest["splits"].get(split) or {}).get("shards", []):
            files = [(shard["file"], shard.get("sha256"), shard["tokens"] * itemsize)]
            if split in ("sft", "sft_val") and "mask_file" not in shard:
                raise DataError(f"{path}: {split} shard {shard['file']} has no mask_file")
            if "mask_file" in shard:
                files.append((shard["mask_file"], shard.get("mask_sha256"), shard["tokens"]))
            for name, digest, size in files:
                f = root / name
                if not f.is_file():
                    raise DataError(f"{f}: shard listed in {path} is missing ({split} split)")
                if f.stat().st_size != size:
                    raise DataError(f"{f}: {f.stat().st_size} bytes, manifest says {size} ({path})")
                if verify and digest and sha256_file(f) != digest:
                    raise DataError(
                        f"{f}: sha256 does not match {path} (corrupt or partly copied shard)"
                    )
    return manifest


def _check_schema(manifest: Any, path: Path) -> None:
    """The manifest's shape: every key this module and training read, with its JSON type, so that a
    hand-edited or foreign manifest.json fails here naming the key, not later with a KeyError."""

    def bad(where: str, what: str) -> DataError:
        return DataError(f"{path}: {where} must be {what}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(manifest, dict):
        raise bad("the top level", f"a JSON object, not {type(manifest).__name__}")
    for key in ("format_version", "dtype", "vocab_size", "eot_id", "splits"):
        if key not in manifest:
            raise DataError(f"{path}: key {key!r} is missing")
    for key in ("vocab_size", "eot_id", "pad_id"):
        if key in manifest and not is_int(manifest[key]):
            raise bad(key, f"an integer, not {manifest[key]!r}")
    if not isinstance(manifest["dtype"], str):
        raise bad("dtype", f"a string, not {manifest['dtype']!r}")
    if not isinstance(manifest["splits"], dict):
        raise bad(
            "splits", f"an object of split name -> entry, not {type(manifest['splits']).__name__}"
        )
    for split, entry in manifest["splits"].items():
        if entry is None:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("shards", []), list):
            raise bad(f"splits.{split}", 'an object with a "shards" list')
        for i, shard in enumerate(entry.get("shards", [])):
            where = f"splits.{split}.shards[{i}]"
            if not isinstance(shard, dict):
                raise bad(where, "an object")
            if not is_int(shard.get("tokens")) or shard["tokens"] < 0:
                raise bad(f"{where}.tokens", f"an integer >= 0, not {shard.get('tokens')!r}")
            for key in ("file", "mask_file"):
                name = shard.get(key)
                if key == "mask_file" and name is None:
                    continue
                # A relative path inside the dataset directory: a manifest never points elsewhere.
                if (
                    not isinstance(name, str)
                    or not name
                    or name.startswith("/")
                    or ".." in Path(name).parts
                ):
                    raise bad(
                        f"{where}.{key}",
                        f"a relative path inside the dataset directory, not {name!r}",
                    )
            for key in ("sha256", "mask_sha256"):
                if shard.get(key) is not None and not isinstance(shard[key], str):
                    raise bad(f"{where}.{key}", f"a hex string, not {shard[key]!r}")


def check_dataset(
    dataset: str | Path,
    splits: tuple[str, ...],
    context_length: int,
    verify_hashes: bool = True,
    world: int = 1,
) -> DatasetInfo:
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
            have = (
                ", ".join(s for s, e in manifest["splits"].items() if e and e.get("shards"))
                or "none"
            )
            raise DataError(f"{mpath}: split {split!r} has no shards (splits with data: {have})")
        # A window is context_length + 1 tokens (inputs plus the shifted targets) inside one shard.
        longest = max(s["tokens"] for s in entry["shards"])
        if longest < context_length + 1:
            raise DataError(
                f"{mpath}: split {split!r} cannot fill context_length={context_length}: its "
                f"longest shard has {longest} tokens, a sequence needs {context_length + 1}; lower "
                "model.context_length"
            )
        windows = sum((s["tokens"] - 1) // context_length for s in entry["shards"])
        if windows < world:
            raise DataError(
                f"{mpath}: split {split!r} holds {windows} sequences of {context_length + 1} "
                f"tokens, fewer than the {world} workers that each need one; use fewer workers or "
                "a shorter context_length"
            )
        split_tokens[split] = sum(s["tokens"] for s in entry["shards"])
    return DatasetInfo(
        path=str(root.resolve()),
        manifest_sha256=sha256_file(mpath),
        tokenizer_sha256=manifest.get("tokenizer_sha256") or sha256_file(root / "tokenizer.json"),
        vocab_size=int(manifest["vocab_size"]),
        eot_id=int(manifest["eot_id"]),
        pad_id=int(manifest.get("pad_id", -1)),
        dtype=manifest["dtype"],
        split_tokens=split_tokens,
    )


def read_shard(dataset_dir: str | Path, shard: dict[str, Any], dtype: str) -> np.ndarray:
    """A shard's token ids as a read-only memory map."""
    return np.memmap(
        Path(dataset_dir) / shard["file"], dtype=np.dtype(dtype).newbyteorder("<"), mode="r"
    )
