"""Two pipelines in one workdir at once never corrupt or delete each other's work: two real
`gptflow run` processes started together on the same config each build nothing the other is
building (a step output is built under its lock; the second waits and reuses it), both end with the
same complete outputs, and no temporary file is left behind."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptcore import load_bundle
from tests.data.preprocess_data import document
from tests.test_cli import _table

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_runs_at_once_build_each_output_once_and_both_finish(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(document(i, 500))
    work = tmp_path / "w"
    args = [
        "run",
        "--no-tracking",
        "--workdir",
        str(work),
        "--only",
        "preprocess",
        "--only",
        "pretrain",
        "--set",
        f"data.inputs=[{corpus}]",
        "--set",
        "data.sft_inputs=[]",
        "--set",
        "data.vocab_size=300",
        "--set",
        "data.val_fraction=0.1",
        "--set",
        "data.val_min_tokens=200",
        "--set",
        "model.preset=tiny",
        "--set",
        "model.context_length=32",
        "--set",
        "pretrain.num_workers=1",
        "--set",
        "pretrain.steps=4",
        "--set",
        "pretrain.micro_batch_size=4",
        "--set",
        "pretrain.precision=fp32",
        "--set",
        "pretrain.checkpoint_every=2",
        "--set",
        "cluster.num_cpus=1",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            outs.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for code, _stdout, stderr in outs:
        assert code == 0, stderr[-3000:]
    bundles = {stdout.strip().splitlines()[-1] for _, stdout, _ in outs}
    assert len(bundles) == 1  # both runs end at the same output
    tables = [_table(stdout) for _, stdout, _ in outs]
    for step in (
        "preprocess",
        "pretrain",
    ):  # built once, by one of them; the other waited and reused it
        assert sorted(t[step][1] for t in tables) == ["done", "ran"], tables

    (dataset,) = [p for p in (work / "preprocess").iterdir() if p.is_dir()]
    assert (dataset / "DONE").is_file() and not (dataset / "_work").exists()
    manifest = json.loads((dataset / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            assert (
                hashlib.sha256((dataset / shard["file"]).read_bytes()).hexdigest()
                == shard["sha256"]
            )
    bundle = Path(bundles.pop())
    model, tok, meta = load_bundle(bundle)
    assert meta["steps"] == 4 and meta["resumed_from_step"] == 0
    assert not [p for p in work.rglob(".*.tmp-*")], "a temporary file was left behind"
