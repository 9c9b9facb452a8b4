"""Object storage: preprocessing reads its corpus from s3://, Ray Train writes its resume
checkpoints to s3:// and resumes from them, against a real S3-compatible server (moto's server mode
on 127.0.0.1) the test starts and stops; credentials come from the AWS_* environment and appear in
no output, log or file. A protocol whose fsspec driver is missing is a one-line error naming the URL
and the pip install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.config import ConfigError
from flows.object_storage import require_driver
from tests.data.preprocess_data import document
from tests.services import moto_s3

ROOT = Path(__file__).resolve().parents[1]
SECRET = "gptflow-s3-secret-Zq81"  # moto accepts any credentials; this one must never show up
BUCKET = "gptflow-test"


def _gptflow(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_missing_fsspec_driver_is_one_line_naming_url_and_install(tmp_path):
    with pytest.raises(
        ConfigError, match=r"data.inputs: az://c/corpus/: .*adlfs.*pip install adlfs"
    ):
        require_driver("az://c/corpus/", "data.inputs: az://c/corpus/")
    require_driver("/local/path", "x")  # local paths need nothing
    # s3fs made unimportable in a real CLI run: the error names the URL, the key and the extra.
    code = (
        "import sys; sys.modules['s3fs'] = None\n"
        "from flows.cli import main\n"
        "sys.exit(main(['preprocess', '--input', "
        "'s3://bucket/corpus/', '--no-tracking', '--workdir', 'w']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert errors == [
        "gptflow preprocess: error: data.inputs: s3://bucket/corpus/: "
        "reading s3:// needs the fsspec driver s3fs, which is not "
        "installed: pip install 'gptflow[cloud]' (or pip install s3fs)"
    ], out.stderr[-3000:]
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_preprocess_from_s3_and_checkpoints_to_s3_resume_exactly(tmp_path):
    with moto_s3(tmp_path) as endpoint:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"
        } | {
            "AWS_ACCESS_KEY_ID": "gptflow-test-key",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
        # the bucket and corpus, written with s3fs as any client would
        setup = (
            "import s3fs, sys; fs = s3fs.S3FileSystem(); fs.mkdir(sys.argv[1])\n"
            "for i in range(6):\n"
            "    fs.pipe(f'{sys.argv[1]}/corpus/doc{i}.txt', sys.argv[2 + i].encode())\n"
        )
        docs = [document(i, 600) for i in range(6)]
        subprocess.run(
            [sys.executable, "-c", setup, BUCKET, *docs], env=env, check=True, timeout=60
        )

        work = tmp_path / "w"
        common = [
            "--no-tracking",
            "--workdir",
            str(work),
            "--only",
            "preprocess",
            "--only",
            "pretrain",
            "--set",
            f"data.inputs=[s3://{BUCKET}/corpus/]",
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
            "pretrain.micro_batch_size=4",
            "--set",
            "pretrain.precision=fp32",
            "--set",
            "pretrain.eval_every=100",
            "--set",
            "pretrain.checkpoint_every=2",
            "--set",
            "pretrain.min_lr_ratio=1.0",
            "--set",
            f"pretrain.storage_path=s3://{BUCKET}/ray",
            "--set",
            "pretrain.run_name=s3run",
            "--set",
            "cluster.num_cpus=2",
        ]
        first = _gptflow("run", *common, "--set", "pretrain.steps=4", env=env, cwd=tmp_path)
        assert first.returncode == 0, first.stderr[-4000:]
        second = _gptflow("run", *common, "--set", "pretrain.steps=6", env=env, cwd=tmp_path)
        assert second.returncode == 0, second.stderr[-4000:]

        listing = (
            "import s3fs, sys, json; fs = s3fs.S3FileSystem()\n"
            "print(json.dumps(fs.find(sys.argv[1])))\n"
        )
        stored = json.loads(
            subprocess.run(
                [sys.executable, "-c", listing, f"{BUCKET}/ray/s3run"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
        )

    # preprocessing read the bucket: the manifest names the s3 files and their ETag fingerprints
    (dataset,) = (work / "preprocess").glob("*/manifest.json")
    manifest = json.loads(dataset.read_text())
    assert [i["path"] for i in manifest["inputs"]] == [
        f"s3://{BUCKET}/corpus/doc{i}.txt" for i in range(6)
    ]
    assert all("tag=" in i["fingerprint"] for i in manifest["inputs"])
    # checkpoints went to S3 (nothing under the workdir's default ray_results) ...
    assert any("/checkpoint_" in p for p in stored), stored
    assert not (work / "ray_results").exists()
    # ... and the 6-step run resumed the 4-step run's last checkpoint from there
    bundles = {
        json.loads(m.read_text())["steps"]: json.loads(m.read_text())
        for m in (work / "pretrain").glob("*/metadata.json")
    }
    assert sorted(bundles) == [4, 6]
    assert bundles[4]["resumed_from_step"] == 0 and bundles[6]["resumed_from_step"] == 4

    # the secret key is nowhere: not in output, logs, manifests or any file of the workdir
    for out in (first, second):
        assert SECRET not in out.stdout + out.stderr
    for f in work.rglob("*"):
        if f.is_file() and f.stat().st_size < 50_000_000:
            assert SECRET.encode() not in f.read_bytes(), f
