"""The step runner: output paths, skip-if-done, only/from/force, failures and MLflow runs.

The steps here are small functions over the real config sections (the runner is the unit under
test, not Ray or DeepSpeed; those run in tests/train and the end-to-end CLI test). Tracking is real
MLflow on a sqlite file where a test looks at runs.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import flows.workdir
from flows import pipeline
from flows.config import PipelineConfig, load_config
from flows.pipeline import PipelineError, Step, StepRef

CALLS: Counter = Counter()


def _writer(name: str, fail: bool = False):
    def run(cfg, inputs, out: Path, ctx) -> Path:
        CALLS[name] += 1
        if fail:
            raise RuntimeError(f"{name} broke")
        parts = {k: (Path(v) / "result.txt").read_text() for k, v in inputs.items() if v}
        (out / "result.txt").write_text(json.dumps({"step": name, "inputs": parts}))
        return out

    return run


def _steps(fail: str | None = None) -> tuple[Step, ...]:
    return (
        Step("prep", _writer("prep", fail == "prep"), ("data",), bind=lambda cfg: {}),
        Step(
            "train",
            _writer("train", fail == "train"),
            ("model", "pretrain"),
            bind=lambda cfg: {"dataset": cfg.pretrain.data or StepRef("prep")},
        ),
        Step(
            "tune",
            _writer("tune", fail == "tune"),
            ("finetune",),
            bind=lambda cfg: {"init": StepRef("train")},
        ),
        Step(
            "eval",
            _writer("eval", fail == "eval"),
            ("evaluate",),
            bind=lambda cfg: {"model": StepRef("tune"), "dataset": StepRef("prep")},
        ),
    )


@pytest.fixture(autouse=True)
def _reset_calls():
    CALLS.clear()


def _cfg(tmp_path: Path, *overrides: str, tracking: bool = False) -> PipelineConfig:
    return load_config(
        None, [f"workdir={tmp_path / 'w'}", f"tracking.enabled={str(tracking).lower()}", *overrides]
    )


def _status(planned) -> dict[str, str]:
    return {p.step.name: p.status for p in planned}


def test_runs_in_order_then_skips_everything(tmp_path):
    cfg = _cfg(tmp_path)
    first = pipeline.run(cfg, steps=_steps())
    assert _status(first) == dict.fromkeys(("prep", "train", "tune", "eval"), "ran")
    for p in first:
        assert (
            p.out == (tmp_path / "w" / p.step.name / p.key).resolve() and (p.out / "DONE").is_file()
        )
        assert json.loads((p.out / "DONE").read_text())["key"] == p.key
    # outputs were wired to inputs: eval saw tune's and prep's results
    seen = json.loads((first[3].out / "result.txt").read_text())["inputs"]
    assert set(seen) == {"model", "dataset"} and json.loads(seen["model"])["step"] == "tune"

    again = pipeline.run(cfg, steps=_steps())
    assert _status(again) == dict.fromkeys(("prep", "train", "tune", "eval"), "done")
    assert CALLS == Counter(prep=1, train=1, tune=1, eval=1)
    assert [p.out for p in again] == [p.out for p in first]


def test_changing_one_section_reruns_that_step_and_downstream_only(tmp_path):
    base = pipeline.run(_cfg(tmp_path), steps=_steps())
    CALLS.clear()
    changed = pipeline.run(_cfg(tmp_path, "pretrain.lr=0.5"), steps=_steps())
    assert _status(changed) == {"prep": "done", "train": "ran", "tune": "ran", "eval": "ran"}
    assert CALLS == Counter(train=1, tune=1, eval=1)
    assert changed[0].out == base[0].out and all(
        a.out != b.out for a, b in zip(changed[1:], base[1:], strict=True)
    )
    CALLS.clear()
    evaluated = pipeline.run(
        _cfg(tmp_path, "pretrain.lr=0.5", "evaluate.max_new_tokens=3"), steps=_steps()
    )
    assert _status(evaluated) == {"prep": "done", "train": "done", "tune": "done", "eval": "ran"}
    # the earlier outputs are all still there and finished
    assert all((p.out / "DONE").is_file() for p in base + changed)


def test_unhashed_keys_do_not_change_the_output(tmp_path):
    a = pipeline.plan(_cfg(tmp_path), _steps())
    b = pipeline.plan(_cfg(tmp_path, "pretrain.run_name=other"), _steps())
    assert [p.key for p in a] == [
        p.key for p in b
    ]  # run_name is declared unhashed (TrainConfig) ...
    c = pipeline.plan(_cfg(tmp_path, f"pretrain.data={tmp_path}"), _steps())
    assert c[1].upstream == () and c[1].inputs["dataset"] == str(
        tmp_path
    )  # ... an outside input replaces prep


def test_force_reruns_the_step_and_its_downstream(tmp_path):
    cfg = _cfg(tmp_path)
    pipeline.run(cfg, steps=_steps())
    marker = pipeline.plan(cfg, _steps())[1].out / "stale.txt"
    marker.write_text("from the first run")
    CALLS.clear()
    forced = pipeline.run(cfg, force=["train"], steps=_steps())
    assert _status(forced) == {"prep": "done", "train": "ran", "tune": "ran", "eval": "ran"}
    assert not marker.exists()  # rebuilt from an empty directory, not patched
    CALLS.clear()
    only = pipeline.run(cfg, only=["train"], force=["train"], steps=_steps())
    assert CALLS == Counter(train=1) and _status(only) == {"prep": "done", "train": "ran"}


def test_only_and_from(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(PipelineError, match=r"step 'train' needs the output of 'prep'.*not done"):
        pipeline.run(cfg, only=["train"], steps=_steps())
    assert CALLS == Counter()
    ran = pipeline.run(cfg, only=["prep"], steps=_steps())
    assert _status(ran) == {"prep": "ran"}  # nothing downstream is even planned
    ran = pipeline.run(cfg, start="train", steps=_steps())
    assert _status(ran) == {"prep": "done", "train": "ran", "tune": "ran", "eval": "ran"}
    with pytest.raises(PipelineError, match=r"no step 'nope'.*prep, train, tune, eval"):
        pipeline.run(cfg, only=["nope"], steps=_steps())


def test_a_failing_step_names_itself_marks_the_parent_failed_and_keeps_earlier_outputs(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path, tracking=True)
    with pytest.raises(PipelineError, match=r"step 'tune' failed: tune broke"):
        pipeline.run(cfg, steps=_steps(fail="tune"))
    planned = pipeline.plan(cfg, _steps())
    assert [p.done for p in planned] == [True, True, False, False]
    assert not (planned[2].out / "DONE").exists()

    client = MlflowClient(f"sqlite:///{(tmp_path / 'w' / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("gptflow").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["pipeline"].info.status == "FAILED" and by_name["tune"].info.status == "FAILED"
    assert by_name["prep"].info.status == by_name["train"].info.status == "FINISHED"
    parent = by_name["pipeline"].info.run_id
    assert all(
        by_name[n].data.tags["mlflow.parentRunId"] == parent for n in ("prep", "train", "tune")
    )
    assert "eval" not in by_name

    # the next run resumes with the failed step: what finished is reused
    CALLS.clear()
    fixed = pipeline.run(cfg, steps=_steps())
    assert _status(fixed) == {"prep": "done", "train": "done", "tune": "ran", "eval": "ran"}


def test_plan_prints_paths_and_state_without_running(tmp_path):
    cfg = _cfg(tmp_path)
    pipeline.run(cfg, only=["prep"], steps=_steps())
    CALLS.clear()
    planned = pipeline.plan(cfg, _steps())
    text = pipeline.describe(planned)
    assert CALLS == Counter()
    lines = text.splitlines()
    assert lines[0].split() == ["step", "status", "time", "output"]
    assert lines[1].split() == ["prep", "done", str(planned[0].out)]
    assert lines[2].split() == ["train", "to", "run", str(planned[1].out)]


def test_default_pipeline_plans_every_step_and_fingerprints_each_file_once(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 100)
    cfg = _cfg(tmp_path, f"data.inputs=[{corpus}]", "data.sft_inputs=[builtin:nothing]")
    with pytest.raises(
        ValueError, match=r"data.sft_inputs: unknown builtin corpus 'builtin:nothing'"
    ):
        pipeline.plan(cfg)
    cfg = _cfg(tmp_path, f"data.inputs=[{corpus}]", "data.sft_inputs=[]")
    hashed: list[Path] = []
    real = flows.workdir.sha256_file
    monkeypatch.setattr(
        flows.workdir, "sha256_file", lambda p, *a: hashed.append(Path(p)) or real(p, *a)
    )
    first = pipeline.plan(cfg)
    assert [p.step.name for p in first] == [
        "preprocess",
        "pretrain",
        "evaluate",
    ]  # no SFT data: no finetune
    assert hashed == [corpus.resolve()]
    second = pipeline.plan(cfg)
    assert hashed == [corpus.resolve()] and [p.key for p in second] == [p.key for p in first]
    corpus.write_text(
        "other text\n" * 100
    )  # new content: new dataset, and so new everything downstream
    third = pipeline.plan(cfg)
    assert all(a.key != b.key for a, b in zip(first, third, strict=True))
    with_sft = pipeline.plan(
        _cfg(tmp_path, f"data.inputs=[{corpus}]", f"data.sft_inputs=[{corpus}]")
    )
    assert [p.step.name for p in with_sft] == ["preprocess", "pretrain", "finetune", "evaluate"]
    assert with_sft[3].upstream == ("finetune", "preprocess")
