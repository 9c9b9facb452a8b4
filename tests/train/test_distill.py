"""Distillation: the distill step is the training loop with a frozen teacher beside the student.

Fast (no Ray): a teacher whose tokenizer differs from the data's, or whose context is shorter than
the student's, is refused before any worker starts, naming the files; `gptflow distill` says the
same and exits 2; the pipeline wires the distill steps only when asked, under the student's own
model name.

Slow (real Ray Train + DeepSpeed, ZeRO-3, two CPU workers): a teacher (the small preset, trained
here in plain torch: any bundle can teach) and three fits of the tiny student with the same data,
seed and steps: on labels alone (the pretrain step), distilled (the pipeline's distill, evaluate,
register and promote steps, MLflow on), and distilled again with a worker lost mid-run. The
distilled student reaches a lower validation loss than the labels-only one; the lost worker's run
ends with the same weights, to the bit; the student is registered under its own name with its
teacher in its lineage.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flows import pipeline, stages
from flows.config import ConfigError, load_config
from flows.data.dataset import DataError
from flows.train.prepare import prepare as prepare_training
from flows.train.windows import TokenWindows
from gptcore import GPT, Tokenizer, load_bundle, preset, save_bundle
from tests.train.train_fixtures import injected_faults, make_dataset, stdlib_docs

ROOT = Path(__file__).resolve().parents[2]
T = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", vocab_size=512)


def _train_plain(model: GPT, dataset: Path, steps: int, lr: float = 3e-3, batch: int = 16) -> GPT:
    """A plain torch loop: how the teacher is made does not matter to the distill step."""
    torch.manual_seed(0)
    data = TokenWindows(dataset, "train", model.config.context_length)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    model.train()
    for step in range(steps):
        x, y, _ = data.train_batch(1, step, 0, 1, batch)
        _, loss = model(torch.from_numpy(x), torch.from_numpy(y), return_logits=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
    return model.eval()


@pytest.fixture(scope="module")
def teacher(dataset, tmp_path_factory) -> Path:
    """The small preset (4 x 128, twice the student's width), trained well past where the student
    gets."""
    torch.manual_seed(0)
    model = _train_plain(GPT(preset("small", vocab_size=512, context_length=T)), dataset, steps=150)
    return save_bundle(
        tmp_path_factory.mktemp("teacher") / "bundle",
        model,
        Tokenizer.load(dataset / "tokenizer.json"),
        {"stage": "pretrain"},
    )


# The student's run, shared by the labels-only baseline (pretrain.*) and the distilled runs
# (distill.*).
_RUN = (
    "num_workers=2",
    "zero_stage=3",
    "precision=fp32",
    "steps=40",
    "micro_batch_size=8",
    "lr=3e-3",
    "warmup_steps=4",
    "min_lr_ratio=1.0",
    "eval_every=40",
    "eval_batches=4",
    "checkpoint_every=10",
    "sample_tokens=4",
    "seed=3",
)


def _cfg(workdir: Path, dataset: Path, *overrides: str, tracking: bool = False):
    return load_config(
        None,
        [
            f"workdir={workdir}",
            f"tracking.enabled={str(tracking).lower()}",
            "model.preset=tiny",
            f"model.context_length={T}",
            f"pretrain.data={dataset}",
            *(f"pretrain.{k}" for k in _RUN),
            "distill.enabled=true",
            f"distill.data={dataset}",
            "distill.student_preset=tiny",
            "distill.alpha=0.2",
            "distill.temperature=1.0",
            *(f"distill.{k}" for k in _RUN),
            "evaluate.max_tokens=4000",
            "evaluate.max_new_tokens=4",
            "evaluate.sample_tokens=16",
            "registry.name=teacher",
            *overrides,
        ],
    )


def _steps(cfg, names):
    try:
        return pipeline.run(cfg, only=names)
    except pipeline.PipelineError as e:
        raise (e.__cause__ or e) from None


def _val_loss(bundle: Path) -> float:
    return json.loads((bundle / "train_result.json").read_text())["metrics"]["val_loss"]


# ------------------------------------------------------------------- fast: checks before any worker


def _mismatched_teacher(dataset: Path, root: Path) -> Path:
    """A teacher with a tokenizer of the same size trained on other text: same vocab_size, other
    ids."""
    other = Tokenizer.train([d[::-1] for _, d in stdlib_docs(200_000)], vocab_size=512)
    assert other.vocab_size == Tokenizer.load(dataset / "tokenizer.json").vocab_size
    return save_bundle(
        root, GPT(preset("tiny", vocab_size=other.vocab_size, context_length=T)), other
    )


def test_a_teacher_with_another_tokenizer_is_refused_before_any_worker(dataset, tmp_path):
    bad = _mismatched_teacher(dataset, tmp_path / "bad")
    cfg = _cfg(tmp_path / "w", dataset)
    with pytest.raises(DataError) as e:
        prepare_training(
            cfg.distill,
            cfg.model,
            dataset,
            None,
            tmp_path / "out",
            pipeline.context(cfg),
            "distill",
            bad,
        )
    message = str(e.value)
    assert "tokenizer mismatch" in message and str(bad / "tokenizer.json") in message, message
    assert str(dataset / "tokenizer.json") in message and f"data.tokenizer_path={bad}" in message, (
        message
    )

    # The command line says the same in one line, exit code 2, before Ray or a worker starts.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "distill",
            "--teacher",
            str(bad),
            "--data",
            str(dataset),
            "--workdir",
            str(tmp_path / "w"),
            "--no-tracking",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "tokenizer mismatch" in out.stderr and "step 'distill' failed" in out.stderr, out.stderr[
        -2000:
    ]
    assert (
        "Started a local Ray instance" not in out.stderr
        and not (tmp_path / "w" / "ray_results").exists()
    )


def test_a_teacher_shorter_than_the_student_or_none_is_refused(dataset, teacher, tmp_path):
    cfg = _cfg(tmp_path, dataset, f"distill.context_length={2 * T}")
    ctx = pipeline.context(cfg)
    with pytest.raises(
        ConfigError, match=rf"distill.context_length={2 * T} exceeds the teacher's context \({T}"
    ):
        prepare_training(
            cfg.distill, cfg.model, dataset, None, tmp_path / "o", ctx, "distill", teacher
        )
    with pytest.raises(ConfigError, match="distill.teacher is empty"):
        prepare_training(
            cfg.distill, cfg.model, dataset, None, tmp_path / "o", ctx, "distill", None
        )
    with pytest.raises(ConfigError, match=r"distill.teacher='/nope': no such directory"):
        prepare_training(
            cfg.distill, cfg.model, dataset, None, tmp_path / "o", ctx, "distill", "/nope"
        )
    with pytest.raises(ConfigError, match="distill.student_preset"):
        prepare_training(
            _cfg(tmp_path, dataset, "distill.student_preset=huge").distill,
            cfg.model,
            dataset,
            None,
            tmp_path / "o",
            ctx,
            "distill",
            teacher,
        )


def test_the_student_takes_the_teachers_vocabulary_and_context(dataset, teacher, tmp_path):
    cfg = _cfg(tmp_path, dataset, "distill.student_preset=tiny")
    p = prepare_training(
        cfg.distill,
        cfg.model,
        dataset,
        None,
        tmp_path / "o",
        pipeline.context(cfg),
        "distill",
        teacher,
    )
    assert p.gpt_config["context_length"] == T and p.gpt_config["vocab_size"] == 512
    assert (
        p.gpt_config["d_model"] == preset("tiny").d_model
        and p.split == "train"
        and p.eval_split == "val"
    )
    assert p.teacher["bundle"] == str(teacher.resolve()) and p.teacher["alpha"] == 0.2
    sft = _cfg(tmp_path, dataset, "distill.split=sft", "distill.context_length=32")
    p = prepare_training(
        sft.distill,
        sft.model,
        dataset,
        None,
        tmp_path / "o",
        pipeline.context(sft),
        "distill",
        teacher,
    )
    assert (p.split, p.gpt_config["context_length"]) == ("sft", 32)


def test_the_teachers_memory_counts_before_any_worker_starts(dataset, tmp_path):
    """Every worker holds the whole teacher: a student that fits alone is refused beside a teacher
    too large for each worker's share of this machine's RAM, with the teacher's figures."""
    import os

    from flows.train.capacity import GIB, preflight, teacher_bytes
    from gptcore import GPTConfig

    cfg = _cfg(tmp_path, dataset)
    student = preset("tiny", vocab_size=512, context_length=T)
    assert preflight(cfg.distill, student, "distill", local=True) is not None  # fits alone
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    layers = int(ram / 4 / (12 * 1024 * 1024)) + 1  # fp32 weights of about all this machine's RAM
    big = GPTConfig(vocab_size=512, context_length=T, n_layer=layers, n_head=16, d_model=1024)
    assert teacher_bytes(big, "fp32", 8, T) > ram / cfg.distill.num_workers
    with pytest.raises(ConfigError, match=r"less the teacher's [\d.]+ GiB on each worker"):
        preflight(cfg.distill, student, "distill", local=True, teacher=big)
    # in bf16 the teacher's weights take half the bytes
    assert teacher_bytes(big, "bf16", 8, T) == pytest.approx(teacher_bytes(big, "fp32", 8, T) / 2)
    assert teacher_bytes(big, "fp32", 8, T) / GIB > 1


def test_the_pipeline_distills_only_when_asked_under_the_students_own_name(tmp_path):
    off = load_config(None, [f"workdir={tmp_path}"])
    assert not {s.name for s in pipeline.STEPS if s.enabled(off)} & set(pipeline.DISTILL_STEPS)
    on = load_config(None, [f"workdir={tmp_path}", "distill.enabled=true", "registry.name=gpt"])
    planned = {p.step.name: p for p in pipeline.plan(on)}
    assert set(pipeline.DISTILL_STEPS) <= set(planned)
    assert (
        planned["distill"].inputs["teacher"] == planned["finetune"].out
    )  # the final model teaches by default
    assert planned["distill_evaluate"].inputs["bundle"] == planned["distill"].out
    assert stages.student_registry(on).name == "gpt-student"
    named = load_config(
        None, [f"workdir={tmp_path}", "distill.enabled=true", "distill.registry_name=small-gpt"]
    )
    assert stages.student_registry(named).name == "small-gpt"
    # The distillation settings shape the student: a new alpha is a new output; a new registry name
    # is not.
    alpha = load_config(None, [f"workdir={tmp_path}", "distill.enabled=true", "distill.alpha=0.9"])
    assert pipeline.plan(alpha, wanted=["distill"])[-1].out != planned["distill"].out
    assert pipeline.plan(named, wanted=["distill"])[-1].out == planned["distill"].out


# ----------------------------------------------------------------- slow: real Ray Train + DeepSpeed


@pytest.fixture(scope="module")
def labels_only(ray_local, dataset, tmp_path_factory) -> Path:
    """The tiny student trained on labels alone: the pretrain step with the distilled runs'
    settings."""
    return pipeline.step_output(
        _steps(_cfg(tmp_path_factory.mktemp("labels"), dataset), ["pretrain"]), "pretrain"
    )


@pytest.fixture(scope="module")
def distilled(ray_local, dataset, teacher, tmp_path_factory):
    """The same student distilled from the teacher through the pipeline's four distill steps, MLflow
    on."""
    cfg = _cfg(tmp_path_factory.mktemp("kd"), dataset, f"distill.teacher={teacher}", tracking=True)
    planned = _steps(cfg, list(pipeline.DISTILL_STEPS))
    return cfg, {p.step.name: p.out for p in planned} | {"planned": planned}


@pytest.mark.slow
def test_a_distilled_student_beats_the_same_student_on_labels_alone(
    labels_only, distilled, teacher, dataset
):
    cfg, outs = distilled
    student = outs["distill"]
    baseline, kd = _val_loss(labels_only), _val_loss(student)
    teacher_loss = _teacher_val_loss(teacher, dataset)
    print(f"\nval loss: teacher {teacher_loss:.4f}, labels only {baseline:.4f}, distilled {kd:.4f}")
    assert teacher_loss < baseline  # a better teacher
    assert kd < baseline - 0.02, (kd, baseline)
    a, b = load_bundle(labels_only)[0], load_bundle(student)[0]
    assert a.config == b.config  # the same student architecture, only the loss differs
    meta = load_bundle(student)[2]
    assert meta["stage"] == "distill" and meta["teacher"]["bundle"] == str(teacher.resolve())
    assert meta["distillation"] == {"alpha": 0.2, "temperature": 1.0}


def _teacher_val_loss(bundle: Path, dataset: Path) -> float:
    model = load_bundle(bundle)[0]
    val = TokenWindows(dataset, "val", T)
    losses = []
    with torch.no_grad():
        for x, y, _ in val.eval_batches(8, 8):
            losses.append(
                float(model(torch.from_numpy(x), torch.from_numpy(y), return_logits=False)[1])
            )
    return float(np.mean(losses))


@pytest.mark.slow
def test_the_student_is_tracked_registered_and_promoted_with_its_teacher_in_the_lineage(
    distilled, teacher
):
    from flows.registry.lineage import lineage, render
    from flows.registry.promote import promote_version
    from flows.tracking import Registry

    cfg, outs = distilled
    registry = Registry(cfg.tracking, cfg.workdir)
    (version,) = registry.versions("teacher-student")
    # The promote step gated it like any model: 40 steps do not pass the smoke checks on
    # generations.
    decision = json.loads((outs["distill_promote"] / "decision.json").read_text())
    assert (decision["name"], decision["version"]) == ("teacher-student", version["version"])
    assert version["tags"]["gptflow.gate"] == ("passed" if decision["promoted"] else "refused"), (
        decision
    )
    if not decision["promoted"]:
        record = promote_version(
            registry,
            "teacher-student",
            version["version"],
            cfg.registry,
            cfg.evaluate,
            Path(cfg.workdir),
            force=True,
        )  # what `gptflow promote --force` does
        assert record["promoted"]
    (version,) = registry.versions("teacher-student")
    assert "champion" in version["aliases"]
    tags = version["tags"]
    assert json.loads(tags["gptflow.teacher"])["bundle"] == str(teacher.resolve())
    assert json.loads(tags["gptflow.distillation"]) == {"alpha": 0.2, "temperature": 1.0}
    assert (
        tags["gptflow.stage"] == "distill"
        and tags["gptflow.run.train"]
        and tags["gptflow.run.evaluate"]
    )
    run = registry.client.get_run(tags["gptflow.run.train"])
    assert run.info.run_name == "distill" and run.data.params["train.alpha"] == "0.2"
    assert {"loss", "ce_loss", "kd_kl", "val_loss"} <= set(run.data.metrics)
    text = render(lineage(registry, "teacher-student@champion", Path(cfg.workdir) / "cache"))
    assert f"teacher: {teacher.resolve()} (alpha 0.2, temperature 1.0)" in text, text

    # what `gptflow distill` prints: the student's figures and registry decision, its bundle last
    from flows.report import distill_report

    report = distill_report(cfg, outs["planned"])
    assert report.splitlines()[-1] == str(outs["distill"])
    assert "evaluation of the distilled student (" in report and "bits/byte" in report, report
    assert f"registry: teacher-student version {version['version']} is " in report, report
    assert "gptflow serve --workdir" in report and "--model teacher-student@champion" in report, (
        report
    )


@pytest.mark.slow
def test_a_lost_worker_resumes_the_distillation_to_identical_weights(
    distilled, dataset, teacher, tmp_path
):
    """Rank 1 exits once at step 25 (after the step-20 checkpoint); Ray restarts the group, which
    reloads the teacher and resumes: the student ends bit-identical to the uninterrupted run."""
    _, outs = distilled
    cfg = _cfg(tmp_path, dataset, f"distill.teacher={teacher}")
    with injected_faults(fail_at_step=25):
        bundle = pipeline.step_output(_steps(cfg, ["distill"]), "distill")
    meta = load_bundle(bundle)[2]
    assert meta["resumed_from_step"] == 20, meta
    a, b = load_bundle(outs["distill"])[0].state_dict(), load_bundle(bundle)[0].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
