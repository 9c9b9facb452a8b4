"""Multi-node, simulated on this machine: a real two-node Ray cluster (a head and a second raylet,
`ray start` twice, one CPU each, token auth on) plus a real `mlflow server` on 127.0.0.1; the
pipeline is submitted to it as a Ray job with `gptflow submit`. Preprocessing tasks and the two
training workers ran on both nodes (node ids in the manifest and in MLflow), every run and the
registered model are in the server, and every process the test started is stopped by its pid."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flows.config import TrackingConfig
from flows.tracking import Registry
from tests.data.preprocess_data import document
from tests.services import mlflow_server, ray_head, ray_worker_node

ROOT = Path(__file__).resolve().parents[1]


def _gptflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )


@pytest.mark.slow
def test_a_job_on_two_nodes_spreads_preprocessing_and_training_and_tracks_to_the_server(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"d{i}.txt").write_text(document(i, 500))
    work = tmp_path / "w"
    temp = Path(
        tempfile.mkdtemp(prefix="gf2", dir="/tmp")
    )  # short: Ray's socket paths live under it
    try:
        with (
            mlflow_server(tmp_path / "mlflow") as tracking,
            ray_head(temp / "ray", num_cpus=1) as head,
            ray_worker_node(head["gcs"], temp / "node2", num_cpus=1) as node2,
        ):
            env = os.environ | {"MLFLOW_TRACKING_URI": tracking}
            sub = _gptflow(
                "-v",
                "submit",
                "--address",
                head["dashboard"],
                "--workdir",
                str(work),
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
                "data.min_work_units=8",
                "--set",
                "data.work_unit_bytes=2048",
                "--set",
                "model.preset=tiny",
                "--set",
                "model.context_length=32",
                "--set",
                "pretrain.num_workers=2",
                "--set",
                "pretrain.steps=4",
                "--set",
                "pretrain.micro_batch_size=4",
                "--set",
                "pretrain.precision=fp32",
                "--set",
                "pretrain.eval_every=4",
                "--set",
                "pretrain.checkpoint_every=4",
                "--set",
                "evaluate.max_new_tokens=4",
                "--set",
                "evaluate.sample_tokens=16",
                "--set",
                "registry.name=two-node",
                env=env,
            )
            assert sub.returncode == 0, sub.stderr[-3000:]
            job = sub.stdout.strip().splitlines()[-1]
            followed = _gptflow(
                "jobs", "logs", job, "--follow", "--address", head["dashboard"], env=env
            )
            (tmp_path / "job.log").write_text(followed.stdout)
            assert followed.stdout.strip().splitlines()[-1] == f"{job}: SUCCEEDED", (
                followed.stdout[-4000:] + followed.stderr[-2000:]
            )
            assert node2.poll() is None  # the second node stayed up throughout

            (manifest,) = (work / "preprocess").glob("*/manifest.json")
            nodes = json.loads(manifest.read_text())["stats"]["worker_nodes"]
            assert len(nodes) == 2, nodes  # preprocessing work units ran on both nodes

            registry = Registry(TrackingConfig(uri=tracking), work)
            (version,) = registry.versions("two-node")
            assert "champion" in version["aliases"]
            runs = registry.client.search_runs(
                [registry.client.get_experiment_by_name("gptflow").experiment_id], max_results=100
            )
            names = {r.info.run_name for r in runs}
            assert {
                "pipeline",
                "preprocess",
                "pretrain",
                "evaluate",
                "register",
                "promote",
            } <= names, names
            (pretrain,) = [r for r in runs if r.info.run_name == "pretrain"]
            ranks = {pretrain.data.tags[f"gptflow.worker.rank{r}.node_id"] for r in (0, 1)}
            assert ranks == set(nodes), (ranks, nodes)  # one training worker on each node
            assert all(r.info.status == "FINISHED" for r in runs)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
