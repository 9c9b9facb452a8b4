"""What the operator sees: the console's progress lines (flows/console.py), the runner's run record
(flows/runstate.py) and `gptflow status` over it and a real MLflow registry (flows/status.py).

The end-to-end quiet terminal -- a real `gptflow run` through a pipe, its line count and its logs --
is asserted in tests/test_cli.py, on the pipeline run that test pays for anyway.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest

from flows import pipeline, runstate
from flows.config import load_config
from flows.console import MARK, Console, _Task, render
from flows.status import render as render_status
from flows.status import status
from tests.evaluate.conftest import tiny_model
from tests.registry.conftest import store, tok  # noqa: F401 - a real MLflow store (sqlite), registered versions
from tests.test_pipeline import _steps


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


class _Tty(_Pipe):
    def isatty(self) -> bool:
        return True


def _console(tmp_path: Path, terminal: io.StringIO, every_s: float = 10.0) -> Console:
    # verbose: nothing is routed (no dup2 of pytest's own file descriptors); progress is drawn the
    # same way
    c = Console(tmp_path, verbose=True, every_s=every_s, terminal=terminal)
    c.tty = terminal.isatty()
    return c


def test_progress_on_a_pipe_is_a_line_at_start_every_interval_and_at_the_end(tmp_path):
    out = _Pipe()
    c = _console(tmp_path, out, every_s=0.2)
    c.update("pretrain", 1, 100, loss=5.0, tokens_per_s=12_345.0)
    for k in range(2, 50):  # many reports in well under 0.2 s: none printed
        c.update("pretrain", k, 100, loss=4.0, tokens_per_s=12_345.0)
    time.sleep(0.25)
    c.update(
        "pretrain", 60, 100, loss=3.5, tokens_per_s=12_000.0
    )  # past the interval: printed, with an ETA
    c.update("pretrain", 100, 100, loss=3.25, tokens_per_s=12_000.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and all(line.startswith(MARK) for line in lines), lines
    assert lines[0] == MARK + "pretrain  step 1/100  loss 5.000  12.3k tok/s"
    assert lines[1].startswith(MARK + "pretrain  step 60/100  loss 3.500  12.0k tok/s  ETA ")
    assert lines[2].startswith(MARK + "pretrain  step 100/100  loss 3.250  12.0k tok/s  in ")
    c.update("preprocess clean", 3, 12, "units", docs_per_s=1500.0)
    assert out.getvalue().splitlines()[-1] == MARK + "preprocess clean  3/12 units  1.5k docs/s"


def test_on_a_terminal_progress_is_one_line_redrawn_under_the_pipelines_lines(tmp_path):
    out = _Tty()
    c = _console(tmp_path, out)
    for k in range(1, 4):
        c.update("finetune", k, 4, loss=2.0)
    c.line("12:00:00 a pipeline line")  # goes above the progress line, which is drawn again
    c.update("finetune", 4, 4, loss=1.5)
    text = out.getvalue()
    assert text.count("\n") == 2  # the pipeline's line, and the finished task's line kept on screen
    assert "\r\x1b[K12:00:00 a pipeline line\n" in text
    assert text.endswith("finetune  step 4/4  loss 1.500  in 0 s\n")


def test_a_note_says_what_the_stage_does_and_for_how_long(tmp_path):
    out = _Pipe()
    c = _console(tmp_path, out)
    with c.step("evaluate"):
        c.note("generating answers to 4 prompts")
    assert out.getvalue().splitlines()[-1] == MARK + "evaluate  generating answers to 4 prompts"
    assert (
        render(_Task("import", "", None, 0.0, 0, note="reading the GGUF file"), 75.0)
        == "import  reading the GGUF file  (1m15s)"
    )


def test_the_run_record_and_status_show_each_steps_state_and_figure(tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", "tracking.enabled=true"])
    with pytest.raises(pipeline.PipelineError):
        pipeline.run(cfg, steps=_steps(fail="tune"))
    run = runstate.read(cfg.workdir)
    assert run["pid"] == os.getpid() and run["finished"] is not None
    assert {k: v["state"] for k, v in run["steps"].items()} == {
        "prep": "ran",
        "train": "ran",
        "tune": "failed",
        "eval": "not run",
    }
    assert run["steps"]["tune"]["error"] == "tune broke" and run["steps"]["prep"]["seconds"] >= 0

    # a step output with a training result gives its figure; the failed step shows its error
    (Path(run["steps"]["train"]["out"]) / "train_result.json").write_text(
        json.dumps({"metrics": {"tokens_per_s": 12345.6, "loss": 3.21}})
    )
    facts = status(cfg)
    steps = {s["step"]: s for s in facts["run"]["steps"]}
    assert [steps[n]["state"] for n in ("prep", "train", "tune", "eval")] == [
        "done",
        "done",
        "failed",
        "not run",
    ]
    assert steps["train"]["figure"] == "12,346 tokens/s, loss 3.210"
    assert steps["tune"]["figure"] == "tune broke" and facts["run"]["running"] is False
    screen = render_status(facts)
    assert "tune   failed" in screen and "12,346 tokens/s" in screen
    assert "serve would load: nothing (no champion yet)" in screen
    assert "schedule: none configured" in screen

    # a record left `running` by a process that is gone reads as interrupted, not running
    record = json.loads(runstate.path(cfg.workdir).read_text())
    record |= {"finished": None, "pid": 2**22 + 12345}
    record["steps"]["eval"]["state"] = "running"
    runstate.path(cfg.workdir).write_text(json.dumps(record))
    assert {s["step"]: s["state"] for s in status(cfg)["run"]["steps"]}["eval"] == "interrupted"


def test_status_shows_champion_challenger_what_serve_loads_and_the_schedule(store, tok, tmp_path):  # noqa: F811
    from flows.registry.promote import promote_version
    from gptcore import save_bundle

    root = store["root"]
    cfg = load_config(
        None, [f"workdir={root}", f"tracking.uri={json.dumps(store['tracking'].uri)}"]
    )
    # two untrained models (no training here: status only reads what the registry holds)
    best, worst = (
        store["add"](
            save_bundle(
                tmp_path / f"b{seed}",
                tiny_model(tok.vocab_size, seed=seed),
                tok,
                {"stage": "pretrain"},
            )
        )
        for seed in (1, 2)
    )
    registry = store["registry"]()
    promote_version(registry, "gpt", best, cfg.registry, cfg.evaluate, root, force=True)
    registry.set_alias("gpt", "challenger", worst)
    schedule = root / "schedule" / "abc"
    schedule.mkdir(parents=True)
    (schedule / "state.json").write_text(
        json.dumps(
            {
                "cron": "0 3 * * *",
                "last_fire": "2026-12-01T03:00:00+00:00",
                "next_fire": "2026-12-02T03:00:00+00:00",
                "started": "2026-12-01T00:00:00",
                "history": [{"outcome": "ran"}],
                "counts": {"ran": 1},
            }
        )
    )

    facts = status(cfg)
    gpt = facts["registry"]["gpt"]
    assert gpt["champion"]["version"] == best and gpt["challenger"]["version"] == worst
    assert (
        gpt["champion"]["bits_per_byte"]
        == registry.version("gpt", best)["tags"]["gptflow.eval.val_bits_per_byte"]
    )
    assert facts["serve"]["model"] == "gpt@champion" and facts["serve"]["version"] == best
    assert facts["serve"]["bundle"] == registry.version("gpt", best)["tags"]["gptflow.bundle"]
    screen = render_status(facts)
    assert f"registry: gpt champion: version {best}, bits/byte " in screen
    assert f"registry: gpt challenger: version {worst}" in screen
    assert f"serve would load: gpt@champion = version {best}" in screen
    assert (
        "schedule '0 3 * * *': last trigger 2026-12-01T03:00:00+00:00: ran; "
        "next 2026-12-02T03:00:00+00:00" in screen
    )
    assert (
        json.loads(json.dumps(facts, default=str))["serve"]["version"] == best
    )  # what --json prints
