"""The `gptflow` command line as a user runs it: a real subprocess, real Ray, DeepSpeed and
MLflow."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import build_parser, resolve_config
from flows.workdir import sha256_file


def _gptflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _table(stdout: str) -> dict[str, list[str]]:
    """The step table `run`/`plan` print (Ray may forward worker log lines before it)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["step", "status"])
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows[line.split()[0]] = line.split()
    return rows


def _assert_quiet(out: subprocess.CompletedProcess, workdir: Path, steps: tuple[str, ...]) -> None:
    """Through a pipe: the pipeline's own lines only (<= 80 besides progress), live progress as
    plain lines, and the Ray, DeepSpeed and MLflow output in <workdir>/logs/<step>.log, each named
    on its step's line."""
    from flows.console import MARK

    both = (out.stderr + out.stdout).splitlines()
    assert len([line for line in both if not line.startswith(MARK)]) <= 80, "\n".join(both)
    assert re.search(r"^  > pretrain  step 6/6  loss \d+\.\d+  .* tok/s", out.stderr, re.M), (
        out.stderr
    )
    assert re.search(r"^  > preprocess tokenize  1/1 units", out.stderr, re.M), out.stderr
    for noise in (
        "RayTrainWorker",
        "TrainController",
        "DeepSpeed",
        "INFO mlflow",
        "UserWarning",
        "it/s]",
    ):
        assert noise not in out.stderr + out.stdout, noise
    logs = workdir / "logs"
    for step in steps:
        assert (
            f"{step}: running (log: w/logs/{step}.log)" in out.stderr
        )  # relative to the current directory
    pretrain = (logs / "pretrain.log").read_text()
    assert (
        "RayTrainWorker" in pretrain and "DeepSpeed" in pretrain and "TrainController" in pretrain
    )
    assert "Started a local Ray instance" in (logs / "preprocess.log").read_text()
    assert "Successfully registered model 'gpt'" in (logs / "register.log").read_text()
    assert "Add type hints to the `predict` method" not in "".join(
        p.read_text() for p in logs.iterdir()
    )


def test_shortcuts_map_onto_the_config():
    args = build_parser().parse_args(
        [
            "finetune",
            "--data",
            "d",
            "--init",
            "models:/gpt@champion",
            "--steps",
            "7",
            "--workers",
            "2",
            "--preset",
            "gpt2-124m",
            "--workdir",
            "w",
            "--set",
            "finetune.lr=0.01",
            "--no-tracking",
        ]
    )
    cfg = resolve_config(args)
    assert (cfg.finetune.data, cfg.finetune.init, cfg.finetune.steps, cfg.finetune.num_workers) == (
        "d",
        "models:/gpt@champion",
        7,
        2,
    )
    assert cfg.model.preset == "gpt2-124m" and cfg.workdir == "w" and cfg.finetune.lr == 0.01
    assert cfg.tracking.enabled is False
    args = build_parser().parse_args(
        ["preprocess", "--input", "a.txt", "--input", "b/", "--sft", "s.jsonl"]
    )
    cfg = resolve_config(args)
    assert cfg.data.inputs == ("a.txt", "b/") and cfg.data.sft_inputs == ("s.jsonl",)


def test_bad_config_is_a_clear_error_and_exit_2(tmp_path):
    out = _gptflow("preprocess", "--set", "data.vocab_sise=300", cwd=tmp_path)
    assert out.returncode == 2
    assert "unknown key 'data.vocab_sise'" in out.stderr
    assert "Traceback" not in out.stderr
    out = _gptflow(
        "preprocess",
        "--input",
        str(tmp_path / "missing.txt"),
        "--workdir",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "missing.txt" in out.stderr


def test_config_prints_resolved_json(tmp_path):
    out = _gptflow("config", "--set", "pretrain.steps=3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pretrain"]["steps"] == 3


@pytest.mark.slow
def test_run_pipeline_prints_bundle_last_and_generate_uses_it(tmp_path):
    """The README's main job, small: preprocess -> pretrain -> finetune -> evaluate, then
    generate."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(
            f"Document {i}: the cat sat on mat number {i} and looked around." * 3
            for i in range(300)
        )
    )
    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        "\n".join(json.dumps({"prompt": f"Q{i}: ", "completion": f"answer {i}"}) for i in range(60))
    )
    args = [
        "--workdir",
        str(tmp_path / "w"),
        "--set",
        f"data.inputs=[{corpus}]",
        "--set",
        f"data.sft_inputs=[{sft}]",
        "--set",
        "data.vocab_size=400",
        "--set",
        "data.val_fraction=0.1",
        "--set",
        "data.val_min_tokens=500",
        "--set",
        "model.preset=tiny",
        "--set",
        "model.context_length=32",
        "--set",
        "pretrain.steps=6",
        "--set",
        "pretrain.micro_batch_size=4",
        "--set",
        "pretrain.eval_every=6",
        "--set",
        "pretrain.checkpoint_every=6",
        "--set",
        "finetune.steps=4",
        "--set",
        "finetune.micro_batch_size=4",
        "--set",
        "finetune.eval_every=4",
        "--set",
        "finetune.checkpoint_every=4",
        "--set",
        "evaluate.max_new_tokens=4",
        "--set",
        "evaluate.sample_tokens=16",
    ]
    out = _gptflow("run", *args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    bundle = Path(lines[-1])
    assert bundle.parent.name == "finetune" and (bundle / "DONE").is_file()
    steps = ("preprocess", "pretrain", "finetune", "evaluate", "register", "promote")
    table = _table(out.stdout)
    assert [table[s][1] for s in steps] == ["ran"] * 6
    pretrained = Path(table["pretrain"][-1])
    meta = json.loads((bundle / "metadata.json").read_text())
    # lineage: the fine-tune's parent is the pretrained bundle of this run, by path and by content
    assert meta["parent"]["bundle"] == str(pretrained)
    assert meta["parent"]["model_sha256"] == sha256_file(pretrained / "model.safetensors")
    assert meta["dataset"] == table["preprocess"][-1]
    assert (
        "evaluation of the final model (" in out.stdout
        and "bits/byte" in out.stdout
        and "mlflow ui --backend-store-uri" in out.stdout
    )
    assert (Path(table["evaluate"][-1]) / "metrics.json").is_file()

    assert "registry: gpt version 1 is champion: first model" in out.stdout
    assert f"gptflow serve --workdir {tmp_path / 'w'}" in out.stdout  # how to serve the champion
    _assert_quiet(out, tmp_path / "w", steps)

    # lineage from the fine-tuned champion down to the raw input files' fingerprints
    facts = _gptflow(
        "lineage", "gpt@champion", "--json", "--workdir", str(tmp_path / "w"), cwd=tmp_path
    )
    assert facts.returncode == 0, facts.stderr[-3000:]
    chain = json.loads(facts.stdout[facts.stdout.index("{") :])
    assert chain["model"]["version"] == "1" and chain["bundle"]["path"] == str(bundle)
    assert all(not run.get("missing") for run in chain["runs"].values())
    parent = chain["bundle"]["parent"]["bundle_facts"]
    assert parent["path"] == str(pretrained) and parent["stage"] == "pretrain"
    inputs = {Path(i["path"]).name: i["fingerprint"] for i in parent["dataset"]["inputs"]}
    assert inputs == {
        "corpus.txt": "sha256:" + sha256_file(corpus),
        "sft.jsonl": "sha256:" + sha256_file(sft),
    }

    again = _gptflow("run", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [_table(again.stdout)[s][1] for s in steps] == ["done"] * 6
    assert again.stdout.strip().splitlines()[-1] == str(bundle)
    planned = _gptflow("plan", *args, "--set", "evaluate.max_new_tokens=5", cwd=tmp_path)
    assert [_table(planned.stdout)[s][1] for s in steps] == [
        "done",
        "done",
        "done",
        "to",
        "to",
        "to",
    ]

    gen = _gptflow("generate", str(bundle), "Q1: ", "--max-new-tokens", "5", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("Q1: ")
    assert (tmp_path / "w" / "mlflow.db").is_file()
