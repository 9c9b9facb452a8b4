"""Stage output directories, DONE markers, atomic writes, file fingerprints and locks.

The pipeline runner (flows/pipeline.py) names a step's directory after the hash of its config and
its inputs' hashes, the stage writes into it, and the runner writes DONE last (atomically), under a
lock on the directory. A finished output is reused, never rewritten.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DONE = "DONE"


def cache_dir() -> Path:
    """The machine's cache shared by every workdir: $GPTFLOW_CACHE, else ~/.cache/gptflow."""
    return Path(os.environ.get("GPTFLOW_CACHE") or Path.home() / ".cache" / "gptflow")


def stage_dir(workdir: str | Path, stage: str, key: str) -> Path:
    """The output directory of `stage` for hash `key`."""
    return Path(workdir) / stage / key


def is_done(path: str | Path) -> bool:
    return (Path(path) / DONE).is_file()


def mark_done(path: str | Path, info: dict[str, Any] | None = None) -> None:
    """Write the DONE marker last, atomically: its presence means the output is complete."""
    atomic_write_text(Path(path) / DONE, json.dumps(info or {}, indent=2, sort_keys=True) + "\n")


def discard(path: str | Path) -> None:
    """Delete an output directory so that no crash half-way leaves it looking finished: DONE goes
    first (and that removal is made durable), then the rest."""
    import shutil

    path = Path(path)
    marker = path / DONE
    if marker.exists():
        marker.unlink()
        fsync_dir(path)
    if path.exists():
        shutil.rmtree(path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, fsync, rename over `path`, fsync the
    directory.

    After a crash `path` holds the old content or the new, never a prefix; once this returns the new
    content survives a power loss (the rename too: it lives in the directory, hence its fsync).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{tmp_suffix()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def tmp_suffix() -> str:
    """``tmp-<host>-<pid>``: unique to this process among all the nodes that share a workdir."""
    import socket

    return f"tmp-{socket.gethostname()}-{os.getpid()}"


def fsync_file(f: Any) -> None:
    """Flush an open binary file and fsync it: its bytes are on disk before it is renamed into
    place."""
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that renames and new names in it survive a crash of the machine."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except (
        OSError
    ) as e:  # some filesystems (and platforms) cannot fsync a directory; nothing more to do
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class FingerprintCache:
    """sha256 of local files, remembered by (path, size, mtime): re-fingerprinting an unchanged
    corpus costs one ``stat`` per file, not a read of every byte.

    Kept in ``<workdir>/.fingerprints.json``. A file rewritten in place keeps neither its size nor
    its mtime in practice; a tool that restores both (``touch -r``) would fool it, as it fools make.
    Losing the file only costs re-hashing; concurrent writers can lose each other's entries, never
    corrupt the file (atomic rename).
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, list[Any]] = {}
        self._dirty = False
        if self.path is not None and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                self._entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._entries = {}

    def sha256(self, path: str | Path) -> str:
        p = Path(path).resolve()
        st = p.stat()
        key = str(p)
        entry = self._entries.get(key)
        if isinstance(entry, list) and entry[:2] == [st.st_size, st.st_mtime_ns]:
            return entry[2]
        digest = sha256_file(p)
        self._entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        if self.path is not None and self._dirty:
            atomic_write_text(self.path, json.dumps(self._entries, sort_keys=True))
            self._dirty = False


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing), held for the block.

    fcntl locks die with their process, so a crashed holder never leaves the lock held.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
