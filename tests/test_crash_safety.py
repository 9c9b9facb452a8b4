"""Crashes never leave an output that is later trusted: files are fsynced before they are renamed
into place and their directory after, a bundle is a bundle only once its metadata.json is back, a
resume counts only complete checkpoints and loads none whose files differ from what was recorded,
and the caches and fingerprints that decide "already done" key on everything that decides the
result."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows.config import TrainConfig
from flows.data.shards import ShardWriter, UnitWriter
from flows.train import checkpoint as ckpt
from flows.workdir import atomic_write_text, is_done
from tests.data.preprocess_data import document


@pytest.fixture
def disk_events(monkeypatch):
    """Every fsync (of a file or a directory) and every rename, in order, by path."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync_dir" if os.path.isdir(path) else "fsync", path))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", f"{src} -> {dst}"))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _renamed_durably(events: list[tuple[str, str]], final: Path) -> int:
    """Assert `final` got its content through fsync(tmp) -> rename(tmp -> final) -> fsync(its dir);
    return the index of that directory fsync."""
    renames = [
        i
        for i, (kind, what) in enumerate(events)
        if kind == "rename" and what.endswith(f" -> {final}")
    ]
    assert renames, f"{final} was not renamed into place: {events}"
    i = renames[-1]
    tmp = events[i][1].split(" -> ")[0]
    assert ("fsync", tmp) in events[:i], f"{tmp} renamed to {final} before it was fsynced: {events}"
    after = [j for j in range(i + 1, len(events)) if events[j] == ("fsync_dir", str(final.parent))]
    assert after, f"{final.parent} not fsynced after {final} was renamed into it: {events}"
    return after[0]


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path, disk_events
):
    atomic_write_text(tmp_path / "DONE", "{}")
    _renamed_durably(disk_events, tmp_path / "DONE")


def test_unit_files_are_durable_before_the_json_that_says_the_unit_is_done(tmp_path, disk_events):
    w = UnitWriter(tmp_path, "00003")
    w.open(".bin").write(b"\x01\x02" * 100)
    w.open(".len.npy").write(b"lengths")
    w.commit({"tokens": 100})
    done_at = _renamed_durably(disk_events, tmp_path / "00003.json")
    for suffix in (".bin", ".len.npy"):
        assert _renamed_durably(disk_events, tmp_path / f"00003{suffix}") < done_at


def test_each_shard_and_its_mask_are_durable_once_closed(tmp_path, disk_events):
    w = ShardWriter(tmp_path, "sft", shard_tokens=8, itemsize=2, masked=True)
    w.write(b"\x00\x01" * 8, mask=b"\x01" * 8, examples=1)
    w.close_shard()
    _renamed_durably(disk_events, tmp_path / "sft" / "00000.bin")
    _renamed_durably(disk_events, tmp_path / "sft" / "00000.mask.bin")


def _tiny_bundle_parts(vocab: int = 300, seed: int = 0):
    import torch

    from gptcore import GPT, Tokenizer, preset

    tok = Tokenizer.train([document(i) for i in range(20)], vocab_size=vocab)
    torch.manual_seed(seed)
    return GPT(
        preset(
            "tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, context_length=16
        )
    ), tok


def test_bundle_files_are_fsynced_and_renamed_with_metadata_last(tmp_path, disk_events):
    from gptcore import save_bundle

    model, tok = _tiny_bundle_parts()
    save_bundle(tmp_path / "b", model, tok)
    done = {
        name: _renamed_durably(disk_events, tmp_path / "b" / name)
        for name in ("model.safetensors", "config.json", "tokenizer.json", "metadata.json")
    }
    assert max(done, key=done.get) == "metadata.json"


def test_a_crash_while_overwriting_a_bundle_leaves_no_loadable_mix(tmp_path, monkeypatch):
    """New weights beside the old tokenizer would load silently; without metadata.json it is no
    bundle."""
    from gptcore import load_bundle, save_bundle
    from gptcore.bundle import BundleError

    old_model, old_tok = _tiny_bundle_parts(seed=0)
    save_bundle(tmp_path / "b", old_model, old_tok)
    new_model, new_tok = _tiny_bundle_parts(seed=1)
    real_replace = os.replace

    def crash_at_tokenizer(src, dst):
        if str(dst).endswith("tokenizer.json"):
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_at_tokenizer)
    with pytest.raises(OSError, match="killed"):
        save_bundle(tmp_path / "b", new_model, new_tok)
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(BundleError, match="metadata.json"):
        load_bundle(tmp_path / "b")
    assert not list((tmp_path / "b").glob(".*tmp*")), "temporary files left behind"


# --------------------------------------------------------------------------- resume checkpoints


def _plan(tmp_path: Path, steps: int) -> SimpleNamespace:
    return SimpleNamespace(
        stage="pretrain",
        train=TrainConfig(steps=steps),
        gpt_config={"n_layer": 1},
        dataset=SimpleNamespace(manifest_sha256="abc"),
        parent=None,
        teacher=None,
        storage_path=str(tmp_path),
        run_name="run",
    )


def _checkpoint(run_dir: Path, step: int, world: int = 2, complete: bool = True) -> Path:
    """A checkpoint directory as Ray assembles it from `world` ranks (each rank's files + its
    record)."""
    d = run_dir / ckpt.checkpoint_dir_name(step)
    for rank in range(world):
        tmp = run_dir / f"rank{rank}-{step}"
        (tmp / f"step{step:08d}").mkdir(parents=True)
        (tmp / f"step{step:08d}" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(
            os.urandom(64)
        )
        (tmp / f"rng_rank{rank:05d}.pt").write_bytes(os.urandom(16))
        if rank == 0:
            (tmp / ckpt.STATE_FILE).write_text(json.dumps({"step": step, "tag": f"step{step:08d}"}))
        ckpt.record_files(tmp, rank, world)
        if (
            complete or rank == 0
        ):  # an incomplete one: the driver died while rank 1's files were on their way
            for f in tmp.rglob("*"):
                if f.is_file():
                    (d / f.relative_to(tmp)).parent.mkdir(parents=True, exist_ok=True)
                    f.rename(d / f.relative_to(tmp))
    return d


def test_the_resume_identity_is_written_atomically(tmp_path, disk_events):
    ckpt.check_resume(_plan(tmp_path, 10))
    _renamed_durably(disk_events, tmp_path / "run" / ckpt.RESUME_FILE)


def test_a_resume_counts_only_complete_checkpoints(tmp_path):
    ckpt.check_resume(_plan(tmp_path, 10))  # a first run records its identity
    _checkpoint(tmp_path / "run", 10)
    _checkpoint(tmp_path / "run", 20, complete=False)
    (
        tmp_path / "run" / ckpt.checkpoint_dir_name(30)
    ).mkdir()  # Ray made the directory, nothing arrived
    assert ckpt.latest_checkpoint(tmp_path / "run") == tmp_path / "run" / ckpt.checkpoint_dir_name(
        10
    )
    ckpt.check_resume(
        _plan(tmp_path, 15)
    )  # resuming step 10 into 15 steps is fine: 20 and 30 never finished
    with pytest.raises(ckpt.ConfigError, match="checkpoint at step 10"):
        ckpt.check_resume(_plan(tmp_path, 5))


def test_a_checkpoint_file_changed_in_storage_is_refused_before_anything_unpickles_it(tmp_path):
    ckpt.check_resume(_plan(tmp_path, 10))
    d = _checkpoint(tmp_path / "run", 10)
    ckpt.verify_checkpoint(d)
    victim = d / "step00000010" / "zero_pp_rank_1_optim_states.pt"
    victim.write_bytes(os.urandom(64))  # same size: only the hash tells
    assert ckpt.is_complete(d)
    with pytest.raises(
        ckpt.CheckpointError, match="zero_pp_rank_1_optim_states.pt: sha256 differs"
    ):
        ckpt.check_resume(_plan(tmp_path, 10))  # the driver, before any worker starts

    class Engine:
        loaded = False

        def load_checkpoint(self, *args, **kwargs):
            Engine.loaded = True
            return "x", {}

    class Checkpoint:
        def as_directory(self):
            import contextlib

            return contextlib.nullcontext(str(d))

    with pytest.raises(ckpt.CheckpointError, match="zero_pp_rank_1_optim_states.pt"):
        ckpt.load_checkpoint(
            Engine(), Checkpoint(), rank=1
        )  # a worker (remote storage: no driver check)
    assert not Engine.loaded
    (d / "sha256_rank00001.json").unlink()  # no record: nothing vouches for rank 1's pickles
    with pytest.raises(ckpt.CheckpointError, match="sha256_rank00001.json: missing"):
        ckpt.load_checkpoint(Engine(), Checkpoint(), rank=1)
    assert not Engine.loaded


# ---------------------------------------------------------------------- what "already done" keys on


def test_the_hugging_face_import_cache_keys_on_every_source_file(tmp_path):
    """Same weights, another tokenizer or config.json: a new import, not the stale cached bundle."""
    from flows.context import StepContext
    from flows.train.prepare import resolve_init
    from gptcore import Tokenizer, load_bundle
    from gptcore.hf import export_gpt2

    model, tok = _tiny_bundle_parts()
    hf = export_gpt2(model, tmp_path / "hf", tok)
    ctx = StepContext(workdir=tmp_path / "w")
    first, _ = resolve_init(str(hf), ctx, "finetune")
    assert is_done(first)

    other = Tokenizer.train(
        [document(100 + i).upper() for i in range(20)], vocab_size=tok.vocab_size
    )
    assert other.vocab_size == tok.vocab_size and other.sha256() != tok.sha256()
    other.save(hf / "tokenizer.json")
    second, _ = resolve_init(str(hf), ctx, "finetune")
    assert second != first
    assert load_bundle(second)[1].sha256() == other.sha256()

    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 1e-3}))
    third, _ = resolve_init(str(hf), ctx, "finetune")
    assert third not in (first, second)
    assert load_bundle(third)[0].config.layer_norm_eps == 1e-3


def test_a_url_without_etag_or_version_is_fingerprinted_by_its_content():
    """memory:// (like a plain HTTP server or file://) gives no content tag: its bytes are hashed,
    so a same-size rewrite is noticed."""
    import fsspec

    from flows.data.inputs import describe

    fs = fsspec.filesystem("memory")
    url = "memory://gptflow-test/corpus.txt"
    fs.pipe(url, b"first version of the corpus")
    before = describe([url])[0].fingerprint
    fs.pipe(url, b"other version of the corpus")
    after = describe([url])[0].fingerprint
    fs.rm(url)
    assert before.startswith("sha256:") and after != before


_FORCE_KILLED = """
import os, shutil, sys
from flows import pipeline
from flows.config import PipelineConfig, TrackingConfig

def build(cfg, inputs, out, ctx):
    for i in range(5):
        (out / f"part{i}.bin").write_bytes(b"x" * 100)

step = pipeline.Step("toy", build, (), lambda cfg: {})
cfg = PipelineConfig(workdir=sys.argv[1], tracking=TrackingConfig(enabled=False))
if sys.argv[2] == "kill":  # the process dies inside the deletion, after its first file is gone
    def rmtree(path, *a, **k):
        first = sorted(p for p in os.listdir(path) if p.startswith("part"))[0]
        os.unlink(os.path.join(path, first))
        os._exit(9)
    shutil.rmtree = rmtree
pipeline.run(cfg, force=["toy"] if sys.argv[2] == "kill" else [], steps=[step])
"""


def test_a_force_rerun_killed_while_deleting_leaves_no_done_beside_missing_files(tmp_path):
    """--force deletes a finished output: DONE goes first (durably), so a kill half-way through the
    deletion leaves an output that is rebuilt, never one that is trusted with files missing."""
    import subprocess
    import sys

    work = tmp_path / "w"
    run = [sys.executable, "-c", _FORCE_KILLED, str(work)]
    assert subprocess.run([*run, "build"], capture_output=True, timeout=120).returncode == 0
    (out,) = [p for p in (work / "toy").iterdir() if p.is_dir()]
    assert is_done(out) and len(list(out.glob("part*.bin"))) == 5
    killed = subprocess.run([*run, "kill"], capture_output=True, timeout=120)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert len(list(out.glob("part*.bin"))) < 5
    assert not is_done(out)
