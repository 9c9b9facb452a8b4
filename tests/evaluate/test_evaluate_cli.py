"""`gptflow evaluate` and `gptflow explain` as a user runs them: real subprocesses, the runner's
output path and DONE for evaluate, the artifact files for explain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _gptflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_evaluate_command_runs_the_step_and_prints_its_output_dir(
    trained_bundle, dataset, tmp_path
):
    args = (
        "evaluate",
        str(trained_bundle),
        "--data",
        str(dataset),
        "--workdir",
        str(tmp_path / "w"),
        "--no-tracking",
        "--set",
        "evaluate.max_new_tokens=4",
        "--set",
        "evaluate.sample_tokens=16",
    )
    out = _gptflow(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = Path(out.stdout.strip().splitlines()[-1])
    assert result.parent == (tmp_path / "w" / "evaluate").resolve() and (result / "DONE").is_file()
    metrics = json.loads((result / "metrics.json").read_text())
    assert metrics["val_tokens"] > 0 and metrics["val_loss"] > 0
    done = json.loads((result / "DONE").read_text())
    assert done["inputs"] == {"bundle": str(trained_bundle), "dataset": str(dataset)}
    again = _gptflow(*args, cwd=tmp_path)  # the same bundle and data: the finished output is reused
    assert again.returncode == 0 and Path(again.stdout.strip().splitlines()[-1]) == result
    assert (result / "metrics.json").read_text() == json.dumps(
        metrics, indent=2, sort_keys=True
    ) + "\n"


def test_evaluate_command_names_a_missing_dataset(trained_bundle, tmp_path):
    out = _gptflow(
        "evaluate",
        str(trained_bundle),
        "--data",
        str(tmp_path / "nowhere"),
        "--workdir",
        str(tmp_path / "w"),
        "--no-tracking",
        cwd=tmp_path,
    )
    assert (
        out.returncode == 2 and "step 'evaluate' failed" in out.stderr and "nowhere" in out.stderr
    )
    assert "Traceback" not in out.stderr


def test_explain_command_writes_its_pictures(trained_bundle, tmp_path):
    out = _gptflow(
        "explain",
        str(trained_bundle),
        "the cat sat on the mat",
        "--out",
        str(tmp_path / "x"),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    folder = Path(out.stdout.strip().splitlines()[-1])
    for name in (
        "loss_heatmap.html",
        "loss_heatmap.png",
        "attention.png",
        "attribution.png",
        "attribution.json",
    ):
        assert (folder / name).stat().st_size > 0, name
    assert (folder / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
