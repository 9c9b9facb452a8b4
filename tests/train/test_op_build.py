"""A build lock left by a killed JIT op build is removed; a young one (a build running) is waited
for, and removed once it is older than any build takes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from flows.train.op_build import build_root, clear_stale_build_locks


def _lock(root, op: str, age_s: float):
    lock = root / "py311_cpu" / op / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_a_stale_lock_is_removed_and_other_files_are_kept(tmp_path):
    stale = _lock(tmp_path, "deepspeed_shm_comm", age_s=3600)
    built = stale.parent / "deepspeed_shm_comm.so"
    built.write_bytes(b"\x7fELF")
    assert clear_stale_build_locks(tmp_path, stale_after_s=600) == [stale]
    assert not stale.exists() and built.exists()
    assert clear_stale_build_locks(tmp_path, stale_after_s=600) == []


def test_a_young_lock_is_waited_for_until_its_build_ends(tmp_path):
    young = _lock(tmp_path, "cpu_adam", age_s=0)
    threading.Timer(0.3, young.unlink).start()  # the build finishes: its process removes the lock
    assert clear_stale_build_locks(tmp_path, stale_after_s=60, poll_s=0.05) == []  # not removed
    assert not young.exists()  # ... but returned only once the build had removed it


def test_a_young_lock_whose_builder_died_is_removed_once_it_is_stale(tmp_path):
    young = _lock(tmp_path, "cpu_adam", age_s=0)
    assert clear_stale_build_locks(tmp_path, stale_after_s=0.3, poll_s=0.05) == [young]
    assert not young.exists()


def test_the_root_is_torchs(monkeypatch, tmp_path):
    from torch.utils.cpp_extension import get_default_build_root

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build_root() == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert build_root() == Path(get_default_build_root())
