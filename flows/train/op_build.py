"""JIT-built C++ ops (DeepSpeed's on CPU) and the lock file a killed build leaves behind.

torch builds an extension (DeepSpeed's shared-memory allreduce on the CPU accelerator, its CPU Adam
with offload) under a ``lock`` file in the op's build directory, and every other process that loads
the op waits for that file to disappear -- with no timeout and no check that its owner is alive.
Every process takes the lock, even when the build is already done (ninja then finds nothing to do),
so a worker stopped or killed at that moment (``gptflow jobs stop``, a lost node, a fault-tolerance
restart) leaves the lock behind, and every later training run on the machine hangs in
``deepspeed.initialize`` without a word. :func:`clear_stale_build_locks` runs on each worker before
DeepSpeed starts: it waits for a young lock (a build may be running) and removes one older than any
build takes.

What it is not: the build itself (torch and DeepSpeed do that, once per machine and torch version).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

# A build here takes about a minute (two small C++ files), a few on a loaded machine or for a
# CUDA op. A lock older than this has no live builder.
STALE_AFTER_S = 600.0


def build_root() -> Path:
    """Where torch builds JIT extensions: TORCH_EXTENSIONS_DIR, else its default under the cache
    (torch.utils.cpp_extension._get_build_directory reads them in this order)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return Path(root)


def clear_stale_build_locks(
    root: Path | None = None, stale_after_s: float = STALE_AFTER_S, poll_s: float = 1.0
) -> list[Path]:
    """Wait while an op's build lock is younger than `stale_after_s`; remove it once it is older.

    Returns the lock files removed (each logged as a warning, naming the op's build directory).
    """
    root = build_root() if root is None else root
    removed: list[Path] = []
    # <root>/<python>_<cpu|cuXY>/<op name>/lock, as torch.utils.cpp_extension lays it out
    for lock in sorted(root.glob("*/*/lock")):
        while True:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                break  # the build finished (or another worker removed it)
            if age < stale_after_s:
                time.sleep(poll_s)
                continue
            try:
                os.unlink(lock)
            except FileNotFoundError:
                break
            log.warning(
                "removed a stale build lock (%.0f s old, its builder is gone): %s", age, lock
            )
            removed.append(lock)
            break
    return removed
