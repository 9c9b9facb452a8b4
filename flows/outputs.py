"""Stage output directories: ``<workdir>/<stage>/<hash>/``, finished when a DONE marker exists.

A stage derives its hash from its config and its inputs' hashes, writes into the directory, and
writes DONE last (atomically). A finished output is reused, never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

DONE = "DONE"


def stage_dir(workdir: str | Path, stage: str, key: str) -> Path:
    """The output directory of `stage` for hash `key`."""
    return Path(workdir) / stage / key


def is_done(path: str | Path) -> bool:
    return (Path(path) / DONE).is_file()


def mark_done(path: str | Path, info: dict[str, Any] | None = None) -> None:
    """Write the DONE marker last, atomically: its presence means the output is complete."""
    atomic_write_text(Path(path) / DONE, json.dumps(info or {}, indent=2, sort_keys=True) + "\n")


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
