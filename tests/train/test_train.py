"""Training stage: pre-flight errors, generated DeepSpeed config, deterministic data, the loss mask
(fast, no Ray), and real Ray Train + DeepSpeed runs on CPU with the tiny preset on real text (slow).

The slow tests share a handful of TorchTrainer fits (each 10-20 s here): one ZeRO-0 fp32 pretraining
run (learning, MLflow, reuse), two ZeRO-3 runs (bundle export and its Hugging Face export, GPT-2's
tiny preset and the Llama family's tiny-llama), an uninterrupted 2-worker ZeRO-2 run
with one injected NaN loss that three other ways of getting there must reproduce exactly (a worker
SIGKILLed from outside under the default max_failures; a worker lost with restarts off, then the
same command again; N steps then 2N under the same run name), a fine-tuning run from that
pretrained model via a Hugging Face GPT-2 directory (ZeRO-1, bf16), and a run stopped by repeated
loss spikes. The data index itself is tests/train/test_windows.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.config import ConfigError, TrainConfig, load_config
from flows.context import StepContext
from flows.data.dataset import DataError, check_dataset
from flows.train.checkpoint import check_resume, resume_step
from flows.train.ds_config import deepspeed_config
from flows.train.loop import compute_loss, is_bad_loss
from flows.train.prepare import check_cluster
from flows.train.prepare import prepare as prepare_training
from flows.train.windows import TokenWindows
from gptcore import GPT, Tokenizer, generate, load_bundle, preset
from tests.steps import prepare, train
from tests.train.train_fixtures import (
    injected_faults,
    make_dataset,
    stdlib_docs,
    unigram_entropy,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", vocab_size=512)


# What these tests were sized for: the tiny preset, one fp32 worker without ZeRO (the pipeline's
# own defaults are a larger bf16 model on two workers).
_TEST_DEFAULTS = [
    "model.preset=tiny",
    "pretrain.steps=400",
    "pretrain.lr=3e-3",
    "finetune.steps=100",
    "finetune.lr=1e-4",
    *(
        f"{s}.{k}"
        for s in ("pretrain", "finetune")
        for k in (
            "num_workers=1",
            "zero_stage=0",
            "precision=fp32",
            "eval_every=50",
            "checkpoint_every=50",
        )
    ),
]


def _cfg(workdir: Path, data: Path, *overrides: str, stage: str = "pretrain"):
    base = [
        f"workdir={workdir}",
        *_TEST_DEFAULTS,
        f"{stage}.data={data}",
        "tracking.enabled=false",
        f"{stage}.warmup_steps=2",
    ]
    return load_config(None, base + list(overrides))


def _copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _state(bundle: Path) -> dict[str, torch.Tensor]:
    model, _, _ = load_bundle(bundle)
    return model.state_dict()


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-7, msg=k)


def _nan_loss_at(step: int) -> contextlib.AbstractContextManager[None]:
    """Rank 0's first micro-batch loss at `step` becomes NaN (the test-only fault `nan_at_step`)."""
    return injected_faults(nan_at_step=step)


def _ckpt_file(run_dir: Path, step: int, name: str) -> dict:
    """A DeepSpeed file of the resume checkpoint at `step` in a Ray run directory."""
    return torch.load(
        run_dir / f"checkpoint_{step:08d}" / f"step{step:08d}" / name, weights_only=False
    )


# ---------------------------------------------------------------------- fast: config and pre-flight


def test_deepspeed_config_is_generated_from_train_config():
    tc = load_config(
        None,
        [
            "pretrain.zero_stage=3",
            "pretrain.precision=bf16",
            "pretrain.micro_batch_size=4",
            "pretrain.grad_accum=2",
            "pretrain.num_workers=2",
            "pretrain.steps=100",
            "pretrain.warmup_steps=10",
            "pretrain.min_lr_ratio=0.2",
        ],
    ).pretrain
    ds = deepspeed_config(tc)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    sched = ds["scheduler"]["params"]
    assert (sched["total_num_steps"], sched["warmup_num_steps"], sched["cos_min_ratio"]) == (
        100,
        10,
        0.2,
    )
    assert "optimizer" not in ds  # torch AdamW is the client optimizer
    off = deepspeed_config(dataclasses.replace(tc, offload_optimizer=True, zero_stage=2))
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert (
        off["optimizer"]["type"] == "AdamW"
        and off["optimizer"]["params"]["weight_decay"] == tc.weight_decay
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["pretrain.zero_stage=4"], "zero_stage=4"),
        (["pretrain.precision=fp8"], "precision"),
        (
            [
                "pretrain.num_workers=2",
                "pretrain.micro_batch_size=4",
                "pretrain.global_batch_size=12",
            ],
            "global_batch_size=12",
        ),
        (["pretrain.eval_every=0"], "eval_every"),
    ],
)
def test_bad_config_values_are_rejected_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_preflight_rejects_bad_setups(dataset, tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}", *_TEST_DEFAULTS])
    with pytest.raises(
        ConfigError, match="pretrain.data is empty"
    ):  # the stage called without a dataset
        prepare_training(
            cfg.pretrain, cfg.model, "", None, tmp_path / "out", StepContext(workdir=tmp_path)
        )
    with pytest.raises(
        ConfigError, match="finetune.init is empty"
    ):  # in the pipeline it is pretrain's output
        prepare_training(
            cfg.finetune,
            cfg.model,
            dataset,
            None,
            tmp_path / "out",
            StepContext(workdir=tmp_path),
            "finetune",
        )
    with pytest.raises(ConfigError, match="fp16.*needs GPUs"):
        prepare(_cfg(tmp_path, dataset, "pretrain.precision=fp16"))
    with pytest.raises(ConfigError, match="offload_optimizer.*zero_stage"):
        prepare(_cfg(tmp_path, dataset, "pretrain.offload_optimizer=true"))
    with pytest.raises(ConfigError, match="stage='eval'"):
        prepare(_cfg(tmp_path, dataset), "eval")
    with pytest.raises(DataError, match="manifest.json: missing"):
        prepare(_cfg(tmp_path, tmp_path / "nowhere"))
    # The val split holds ~9k tokens in one shard: a 16k context cannot be filled.
    with pytest.raises(DataError, match="cannot fill context_length=16384"):
        prepare(_cfg(tmp_path, dataset, "model.context_length=16384"))
    with pytest.raises(
        DataError, match="split 'val' holds 2 sequences of 4097 tokens, fewer than the 3 workers"
    ):
        prepare(_cfg(tmp_path, dataset, "model.context_length=4096", "pretrain.num_workers=3"))
    ok = prepare(_cfg(tmp_path, dataset))
    assert (
        ok.gpt_config["vocab_size"] == 512
        and ok.output_dir.parent == (tmp_path / "pretrain").resolve()
    )
    # The Ray run name is derived from the output hash, so re-running a stopped config resumes it;
    # an explicit run_name (to resume a run by name) does not change what is trained.
    assert ok.run_name == f"pretrain-{ok.key}"
    named = prepare(_cfg(tmp_path, dataset, "pretrain.run_name=my-run"))
    assert named.run_name == "my-run" and named.key == ok.key


def test_preflight_rejects_missing_and_corrupt_shards(dataset, tmp_path):
    missing = _copy_dataset(dataset, tmp_path / "missing")
    (missing / "train" / "00001.bin").unlink()
    with pytest.raises(DataError, match=r"train/00001.bin: shard listed in .* is missing"):
        prepare(_cfg(tmp_path, missing))
    corrupt = _copy_dataset(dataset, tmp_path / "corrupt")
    shard = corrupt / "train" / "00000.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="00000.bin: sha256 does not match"):
        prepare(_cfg(tmp_path, corrupt))
    truncated = _copy_dataset(dataset, tmp_path / "truncated")
    mask = truncated / "sft" / "00000.mask.bin"
    mask.write_bytes(mask.read_bytes()[:-10])
    with pytest.raises(DataError, match="00000.mask.bin: .* bytes, manifest says"):
        check_dataset(truncated, ("sft",), 128)


def test_preflight_rejects_tokenizer_mismatch_with_init_model(dataset, tmp_path):
    from gptcore import save_bundle

    other = Tokenizer.train([d for _, d in stdlib_docs(50_000)], vocab_size=300)
    bundle = save_bundle(
        tmp_path / "other", GPT(preset("tiny", vocab_size=other.vocab_size)), other
    )
    cfg = _cfg(tmp_path, dataset, f"finetune.init={bundle}", stage="finetune")
    with pytest.raises(DataError, match="tokenizer mismatch"):
        prepare(cfg, "finetune")
    with pytest.raises(ConfigError, match="no such directory"):
        prepare(
            _cfg(tmp_path, dataset, f"finetune.init={tmp_path / 'nope'}", stage="finetune"),
            "finetune",
        )


def test_a_model_source_error_names_the_config_key_that_gave_it(tmp_path, monkeypatch):
    """Resolving an init or teacher names the key the user set (distill.teacher, finetune.init),
    never an internal name: here a registered model whose download holds no bundle, and an unknown
    builtin."""
    import flows.models.base
    import flows.tracking
    from flows.train.prepare import resolve_init

    def download(uri, dst, *args, **kwargs):  # a registered model without the bundle files
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(dst)

    monkeypatch.setattr(flows.tracking, "download_model", download)
    monkeypatch.setattr(
        flows.models.base, "identity", lambda source, ctx: {"uri": source}, raising=False
    )
    ctx = StepContext(workdir=tmp_path)
    with pytest.raises(
        ConfigError, match=r"^distill\.teacher='models:/m@champion': .*holds no bundle"
    ):
        resolve_init("models:/m@champion", ctx, "distill", key="teacher")
    with pytest.raises(ConfigError, match=r"^finetune\.init='builtin:no-such-model': "):
        resolve_init("builtin:no-such-model", ctx, "finetune")


def test_preflight_rejects_gpu_and_cpus_the_cluster_lacks(ray_local):
    tc = load_config(None, ["pretrain.use_gpu=true"]).pretrain
    with pytest.raises(ConfigError, match="use_gpu=true.*0 GPUs"):
        check_cluster(tc, "pretrain", local=True)
    tc = load_config(None, ["pretrain.num_workers=3"]).pretrain
    with pytest.raises(ConfigError, match="3 CPUs, but the local Ray instance has 2"):
        check_cluster(tc, "pretrain", local=True)


# --------------------------------------------------------------------------- fast: data and loss


def test_finetune_gradient_ignores_prompt_targets(dataset):
    """Changing the target tokens of prompt positions (mask 0) leaves the gradient unchanged."""
    sft = TokenWindows(dataset, "sft", 64)
    x, y, m = sft.batch(np.arange(4))
    assert m is not None and 0 < m.sum() < m.size  # both prompt and completion positions present
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=512, context_length=64))

    def grads(targets: np.ndarray) -> list[torch.Tensor]:
        model.zero_grad()
        compute_loss(model, (x, targets, m), torch.device("cpu")).backward()
        return [p.grad.clone() for p in model.parameters()]

    scrambled = y.copy()
    rng = np.random.default_rng(0)
    scrambled[~m] = rng.integers(0, 512, size=int((~m).sum()))
    assert not np.array_equal(scrambled, y)
    for a, b in zip(grads(y), grads(scrambled), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ...while a completion target does change it (the mask is not all-or-nothing).
    changed = y.copy()
    r, c = np.argwhere(m)[0]
    changed[r, c] = (changed[r, c] + 1) % 512
    assert any(not torch.equal(a, b) for a, b in zip(grads(y), grads(changed), strict=True))


def test_failure_message_says_what_gave_up_where_and_how_to_resume(dataset, tmp_path):
    from ray.train import WorkerGroupError

    from flows.train.driver import failure_message

    p = prepare(_cfg(tmp_path, dataset))  # the default max_failures
    run_dir = Path(p.storage_path) / p.run_name
    lost = WorkerGroupError("rank 1: ActorDiedError", {1: RuntimeError("died")})
    fresh = failure_message(p, lost)
    assert f"max_failures={p.train.max_failures}" in fresh and "restarts are exhausted" in fresh, (
        fresh
    )
    assert "no resume checkpoint yet" in fresh and "from step 0" in fresh, fresh
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint_manager_snapshot.json").write_text(
        json.dumps(  # what Ray writes, trimmed
            {
                "latest_checkpoint_result": {
                    "checkpoint_dir_name": "checkpoint_00000006",
                    "metrics": {"step": 6},
                }
            }
        )
    )
    message = failure_message(p, lost)
    assert (
        f"under {run_dir}: re-run the same command (without --force) to resume from step 6"
        in message
    ), message
    assert message.endswith(
        "WorkerGroupError: Training failed due to worker errors:\nrank 1: ActorDiedError"
    )
    other = failure_message(
        p, ValueError("no such resources")
    )  # not a worker failure: never retried
    assert "exhausted" not in other and "resume from step 6" in other, other


def test_fault_injection_is_read_from_the_environment_only(monkeypatch):
    """The test-only faults are no TrainConfig key; GPTFLOW_FAULT_INJECT carries them to the workers
    and a typo in it is an error, not a silent no-op."""
    from flows.train import faults

    assert "fail_at_step" not in {f.name for f in dataclasses.fields(TrainConfig)}
    assert faults.parse("fail_at_step=6, nan_at_step=1") == faults.Faults(
        fail_at_step=6, nan_at_step=1
    )
    assert faults.parse(faults.encode(faults.Faults(nan_at_step=3))) == faults.Faults(nan_at_step=3)
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.from_env() == faults.Faults() and faults.worker_env() == {}
    monkeypatch.setenv(faults.ENV, "fail_at_step=2")
    assert faults.worker_env() == {faults.ENV: "fail_at_step=2"}
    monkeypatch.setenv(faults.ENV, "fail_at=2")
    with pytest.raises(
        ValueError, match="GPTFLOW_FAULT_INJECT='fail_at=2': 'fail_at=2' is not one of"
    ):
        faults.worker_env()


def test_bad_loss_detection():
    assert is_bad_loss(float("nan"), None, 0.0) and is_bad_loss(float("inf"), 2.0, 0.0)
    assert not is_bad_loss(9.0, 2.0, 0.0)  # spike detection off
    assert is_bad_loss(9.0, 2.0, 3.0) and not is_bad_loss(5.0, 2.0, 3.0)
    assert not is_bad_loss(9.0, None, 3.0)  # no running mean yet


def test_resume_by_name_refuses_a_changed_config(dataset, tmp_path):
    first = prepare(_cfg(tmp_path, dataset, "pretrain.run_name=r", "pretrain.steps=10"))
    check_resume(first)
    # More steps, other logging/checkpoint intervals: the same run, resumable (and a new output
    # hash).
    longer = prepare(
        _cfg(
            tmp_path,
            dataset,
            "pretrain.run_name=r",
            "pretrain.steps=20",
            "pretrain.eval_every=5",
            "pretrain.keep_checkpoints=4",
        )
    )
    check_resume(longer)
    assert longer.key != first.key and longer.output_dir != first.output_dir
    with pytest.raises(
        ConfigError, match=r"run_name='r'.*different train\.lr, train\.warmup_steps"
    ):
        check_resume(
            prepare(
                _cfg(
                    tmp_path,
                    dataset,
                    "pretrain.run_name=r",
                    "pretrain.lr=5e-4",
                    "pretrain.warmup_steps=3",
                )
            )
        )
    check_resume(
        prepare(_cfg(tmp_path, dataset, "pretrain.run_name=other", "pretrain.lr=5e-4"))
    )  # a new name is fine


def test_resume_by_name_refuses_fewer_steps_than_its_checkpoint(dataset, tmp_path):
    first = prepare(_cfg(tmp_path, dataset, "pretrain.run_name=r", "pretrain.steps=10"))
    check_resume(first)
    run_dir = Path(first.storage_path) / "r"
    from flows.train.checkpoint import STATE_FILE, record_files

    for step in (4, 8):  # complete checkpoints, in the layout the loop's ray.train.report writes
        ckpt = run_dir / f"checkpoint_{step:08d}"
        ckpt.mkdir()
        (ckpt / STATE_FILE).write_text(json.dumps({"step": step, "tag": f"step{step:08d}"}))
        record_files(ckpt, rank=0, world_size=1)
    (
        run_dir / "checkpoint_00000009"
    ).mkdir()  # incomplete (a run killed while Ray gathered it): not counted
    check_resume(
        prepare(_cfg(tmp_path, dataset, "pretrain.run_name=r", "pretrain.steps=8"))
    )  # same step: fine
    with pytest.raises(
        ConfigError, match=r"pretrain\.steps=6: run 'r' .* checkpoint at step 8.*never fewer"
    ):
        check_resume(prepare(_cfg(tmp_path, dataset, "pretrain.run_name=r", "pretrain.steps=6")))


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory) -> Iterator[None]:
    """A gloo world of one in this process, so a real DeepSpeed engine can be built without Ray.

    Module-scoped: DeepSpeed caches its process groups, so the group must outlive every engine
    built."""
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {
            "DS_ACCELERATOR": "cpu",
            "LOCAL_RANK": "0",
            "RANK": "0",
            "WORLD_SIZE": "1",
        }.items():
            mp.setenv(k, v)  # what a launcher (or Ray Train) sets for DeepSpeed
        pg = tmp_path_factory.mktemp("pg") / "store"
        dist.init_process_group("gloo", init_method=f"file://{pg}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_skipped_update_and_resumed_lr_on_a_real_engine(one_process_group, tmp_path, zero_stage):
    """DeepSpeed engine level (one process): a gated step leaves weights and Adam state untouched
    while the lr schedule advances; resuming an N-step checkpoint under a 2N-step config makes the
    very next step use the 2N schedule's lr (the optimizer's saved lr is the N schedule's)."""
    from flows.train.checkpoint import STATE_FILE, load_checkpoint, record_files
    from flows.train.engine import init_engine

    def engine_for(steps: int):
        tc = load_config(
            None,
            [
                f"pretrain.steps={steps}",
                "pretrain.warmup_steps=1",
                f"pretrain.zero_stage={zero_stage}",
                "pretrain.micro_batch_size=4",
                "pretrain.num_workers=1",
                "pretrain.precision=fp32",
            ],
        ).pretrain
        torch.manual_seed(0)
        return init_engine(
            tc,
            deepspeed_config(tc),
            torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)),
        )

    def train_step(engine) -> None:
        x = torch.randn(4, 8)
        engine.backward(engine(x).pow(2).mean())
        engine.step()

    def lr(engine) -> float:  # what the next step uses
        return engine.basic_optimizer.param_groups[0]["lr"]

    engine, gate = engine_for(4)
    train_step(engine)
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    adam = {
        i: {k: v.clone() for k, v in st.items()}
        for i, st in enumerate(engine.basic_optimizer.state.values())
    }
    position = engine.lr_scheduler.last_batch_iteration
    gate.skip = True
    train_step(engine)
    gate.skip = False
    for k, v in engine.module.state_dict().items():
        assert torch.equal(v, weights[k]), k
    after = {i: st for i, st in enumerate(engine.basic_optimizer.state.values())}
    assert adam.keys() == after.keys() and adam  # Adam state exists and was not touched
    for i in adam:
        for k in adam[i]:
            assert torch.equal(adam[i][k], after[i][k]), (i, k)
    assert (
        engine.lr_scheduler.last_batch_iteration == position + 1
    )  # the schedule's clock is the step count
    train_step(engine)
    assert not torch.equal(
        engine.module.state_dict()["0.weight"], weights["0.weight"]
    )  # ungated steps update
    train_step(engine)

    ckpt = tmp_path / "ckpt"
    engine.save_checkpoint(str(ckpt), tag="step00000004")
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 4, "tag": "step00000004"}))
    record_files(ckpt, rank=0, world_size=1)  # what save_checkpoint records: load verifies it
    longer, _ = engine_for(8)
    load_checkpoint(
        longer,
        types.SimpleNamespace(as_directory=lambda: contextlib.nullcontext(str(ckpt))),
        rank=0,
    )
    reference, _ = engine_for(8)  # uninterrupted 8-step schedule after 4 steps
    for _ in range(4):
        train_step(reference)
    assert lr(longer) == pytest.approx(lr(reference), rel=1e-12)
    assert lr(engine) != pytest.approx(
        lr(reference), rel=1e-3
    )  # the 4-step schedule is elsewhere by now


# ----------------------------------------------------------------- slow: real Ray Train + DeepSpeed


@pytest.fixture(scope="module")
def pretrained(ray_local, dataset, tmp_path_factory):
    """ZeRO-0, fp32, one worker, MLflow on: long enough to learn well past unigram statistics."""
    workdir = tmp_path_factory.mktemp("pre")
    cfg = _cfg(
        workdir,
        dataset,
        "tracking.enabled=true",
        "pretrain.steps=200",
        "pretrain.lr=3e-3",
        "pretrain.micro_batch_size=16",
        "model.context_length=64",
        "pretrain.eval_every=100",
        "pretrain.checkpoint_every=100",
        "pretrain.warmup_steps=5",
    )
    return cfg, train(cfg)


@pytest.mark.slow
def test_pretrain_learns_tracks_and_is_reused(pretrained, dataset):
    from mlflow.tracking import MlflowClient

    cfg, bundle = pretrained
    done = json.loads((bundle / "DONE").read_text())
    result = json.loads((bundle / "train_result.json").read_text())
    entropy = unigram_entropy(dataset)
    # Below the best context-free model by a clear margin: the model uses context.
    assert result["metrics"]["val_loss"] < entropy - 0.5, (result["metrics"], entropy)
    model, tok, meta = load_bundle(bundle)
    assert (
        meta["dataset_manifest_sha256"]
        and meta["config_hash"] == bundle.name
        and meta["parent"] is None
    )
    assert meta["steps"] == 200 and model.config.vocab_size == tok.vocab_size == 512

    client = MlflowClient(f"sqlite:///{Path(cfg.workdir).resolve() / 'mlflow.db'}")
    run = client.get_run(done["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.zero_stage"] == "0"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, 201))
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "val_perplexity"} <= set(
        run.data.metrics
    )
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "deepspeed_config.json",
        "train_config.json",
        "loss_curve.png",
        "samples",
        "bundle",
    } <= names
    bundle_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "metadata.json"} <= bundle_files

    # Same config again: the finished output is returned, nothing retrained or rewritten.
    stamp = (bundle / "model.safetensors").stat().st_mtime_ns
    assert train(cfg) == bundle and (bundle / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.parametrize("model_preset", ["tiny", "tiny-llama"])
def test_zero3_two_workers_exports_consolidated_bundle(ray_local, dataset, tmp_path, model_preset):
    """GPT-2 and the Llama family (RoPE, GQA, SwiGLU, RMSNorm, an untied head) through the same
    pipeline: ZeRO-3 sharded over two workers, consolidated into one bundle."""
    cfg = _cfg(
        tmp_path,
        dataset,
        f"model.preset={model_preset}",
        "pretrain.zero_stage=3",
        "pretrain.num_workers=2",
        "pretrain.steps=8",
        "pretrain.eval_every=8",
        "pretrain.checkpoint_every=8",
        "pretrain.eval_batches=2",
        "pretrain.micro_batch_size=4",
    )
    bundle = train(cfg)
    reported = json.loads((bundle / "train_result.json").read_text())["metrics"]["val_loss"]
    model, tok, _ = load_bundle(bundle)
    assert model.config == preset(model_preset, vocab_size=tok.vocab_size)
    # The gathered weights reproduce the validation loss the sharded engine measured.
    total, n = 0.0, 0
    with torch.no_grad():
        for rank in (0, 1):
            val = TokenWindows(dataset, "val", model.config.context_length, rank, 2)
            for batch in val.eval_batches(2, 4):
                total += float(compute_loss(model, batch, torch.device("cpu"))) * len(batch[0])
                n += len(batch[0])
    assert math.isclose(total / n, reported, rel_tol=1e-4), (total / n, reported)
    out = generate(model, tok.encode("The"), max_new_tokens=8)
    assert len(out) == 8 and all(0 <= t < tok.vocab_size for t in out)
    # Exported to Hugging Face (gptflow export), transformers computes the same logits from it.
    transformers = pytest.importorskip("transformers")
    from flows.models.importer import export_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export_model(bundle, tmp_path / "hf")
    ).eval()
    assert type(hf).__name__ == (
        "LlamaForCausalLM" if model_preset == "tiny-llama" else "GPT2LMHeadModel"
    )
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=1e-4, rtol=1e-4)


# Shared by the uninterrupted ZeRO-2 run and the two other ways of getting to it. min_lr_ratio=1
# makes the lr constant after warmup, so the schedule does not depend on `steps` and an N-step run
# resumed into 2N steps must match the uninterrupted 2N run exactly (with a cosine decay it must
# not: the first N steps would follow the N-step schedule;
# test_skipped_update_and_resumed_lr_on_a_real_engine checks the lr a resumed run takes). One NaN
# loss on rank 0 at step index 1 in every run.
ZERO2 = (
    "pretrain.zero_stage=2",
    "pretrain.num_workers=2",
    "pretrain.steps=10",
    "pretrain.eval_every=10",
    "pretrain.checkpoint_every=4",
    "pretrain.eval_batches=1",
    "pretrain.micro_batch_size=4",
    "pretrain.grad_accum=2",
    "pretrain.min_lr_ratio=1.0",
)
NAN_STEP = 1


@pytest.fixture(scope="module")
def zero2_uninterrupted(ray_local, dataset, tmp_path_factory) -> Path:
    with _nan_loss_at(NAN_STEP):
        return train(_cfg(tmp_path_factory.mktemp("clean"), dataset, *ZERO2))


def _train_workers(since: float) -> list:
    """The Ray Train worker processes of this test process's own Ray instance started after
    `since`."""
    import psutil

    found = []
    for proc in psutil.Process().children(
        recursive=True
    ):  # raylet's workers: never another user's Ray
        try:
            if proc.create_time() >= since and any(
                "ray::RayTrainWorker" in a for a in proc.cmdline()
            ):
                found.append(proc)
        except psutil.Error:  # gone meanwhile
            pass
    return sorted(found, key=lambda q: q.pid)


@pytest.mark.slow
def test_worker_killed_from_outside_resumes_by_default_to_identical_weights(
    zero2_uninterrupted, dataset, tmp_path
):
    """SIGKILL one worker once Ray holds a checkpoint: with the default max_failures the run
    restarts from it and ends bit-identical to the uninterrupted run."""
    # checkpoint_every does not enter the weights: a checkpoint every 2 steps leaves 8 to kill in.
    cfg = _cfg(tmp_path, dataset, *ZERO2, "pretrain.checkpoint_every=2")
    assert (
        cfg.pretrain.max_failures == TrainConfig().max_failures > 0
    )  # the default, not a test override
    p = prepare(cfg)
    killed: list[tuple[int, int]] = []
    done = threading.Event()
    since = time.time() - 1  # psutil's create_time is rounded

    def kill_one_worker() -> None:
        while not done.is_set():
            step = resume_step(p.storage_path, p.run_name)  # Ray registered a checkpoint
            workers = _train_workers(since) if step is not None else []
            if workers:
                os.kill(workers[0].pid, signal.SIGKILL)
                killed.append((workers[0].pid, step))
                return
            done.wait(0.02)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    try:
        with _nan_loss_at(NAN_STEP):
            bundle = train(cfg)
    finally:
        done.set()
        killer.join()
    assert killed, "the run ended before a worker could be killed"
    pid, killed_after = killed[0]
    meta = load_bundle(bundle)[2]
    # The last worker group started from a checkpoint at or after the one that existed at the kill.
    assert meta["resumed_from_step"] >= killed_after > 0 and meta["skipped_updates"] == 1, (
        meta,
        killed,
    )
    _assert_same_weights(zero2_uninterrupted, bundle)


@pytest.mark.slow
def test_exhausted_restarts_say_how_to_resume_and_the_same_command_does(
    zero2_uninterrupted, dataset, tmp_path
):
    """Rank 1 exits at step 6 with restarts off: the error says so, where the checkpoints are and
    that a re-run resumes from step 4; the same command then does, to the uninterrupted weights."""
    cfg = _cfg(tmp_path, dataset, *ZERO2, "pretrain.max_failures=0")
    p = prepare(cfg)
    run_dir = Path(p.storage_path) / p.run_name
    with (
        injected_faults(fail_at_step=6),
        _nan_loss_at(NAN_STEP),
        pytest.raises(RuntimeError) as failed,
    ):
        train(cfg)
    message = str(failed.value)
    assert (run_dir / "injected_failure_step6").is_file()  # rank 1 really exited at step 6
    assert f"Its resume checkpoints are under {run_dir}" in message, message
    assert "restarts are off (max_failures=0)" in message and "pretrain.max_failures" in message, (
        message
    )
    assert "re-run the same command (without --force) to resume from step 4" in message, message
    assert not (p.output_dir / "DONE").exists()

    # the same command (the injected failure happens once per run)
    with injected_faults(fail_at_step=6), _nan_loss_at(NAN_STEP):
        bundle = train(cfg)
    _assert_same_weights(zero2_uninterrupted, bundle)
    meta = load_bundle(bundle)[2]
    assert (
        meta["resumed_from_step"] == 4 and meta["skipped_updates"] == 1
    )  # the NaN step is not counted twice
    # keep_checkpoints=2 holds across the restart: of 4, 8 and 10 only the last two are left.
    assert sorted(d.name for d in run_dir.glob("checkpoint_0*") if d.is_dir()) == [
        "checkpoint_00000008",
        "checkpoint_00000010",
    ]


@pytest.mark.slow
def test_nan_loss_is_skipped_and_a_run_resumes_by_name_into_more_steps(
    zero2_uninterrupted, dataset, tmp_path
):
    """Two fits under one run_name: 5 steps (a checkpoint every step), then 10 steps, which resumes
    from the step-5 checkpoint into a new output directory and must equal the uninterrupted 10-step
    run.

    The NaN at step index 1 (the 2nd update) is skipped and counted: the step-2 checkpoint holds the
    step-1 weights and Adam state bit for bit (no optimizer update at all, not just lr=0) while the
    lr schedule advanced, and training goes on to a finite loss."""
    storage = tmp_path / "runs"
    named = (f"pretrain.storage_path={storage}", "pretrain.run_name=extend")
    first_cfg = _cfg(
        tmp_path,
        dataset,
        *ZERO2,
        *named,
        "pretrain.steps=5",
        "pretrain.checkpoint_every=1",
        "pretrain.keep_checkpoints=5",
    )
    with _nan_loss_at(NAN_STEP):
        first = train(first_cfg)
    done = json.loads((first / "train_result.json").read_text())["metrics"]
    assert done["skipped_updates"] == 1 and math.isfinite(done["loss"]) and done["step"] == 5

    run_dir = storage / "extend"
    model_states = {s: _ckpt_file(run_dir, s, "mp_rank_00_model_states.pt") for s in (1, 2, 3)}
    for k, v in model_states[1]["module"].items():
        assert torch.equal(v, model_states[2]["module"][k]), (
            k
        )  # the skipped update changed no weight
    assert any(
        not torch.equal(v, model_states[3]["module"][k])
        for k, v in model_states[2]["module"].items()
    )
    sched = [model_states[s]["lr_scheduler"]["last_batch_iteration"] for s in (1, 2, 3)]
    assert (
        sched[1] == sched[0] + 1 and sched[2] == sched[1] + 1
    )  # the schedule still counts the skipped step
    for rank in (0, 1):
        optim = [
            _ckpt_file(run_dir, s, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")[
                "optimizer_state_dict"
            ]["base_optimizer_state"]
            for s in (1, 2)
        ]
        states = [o["state"] if "state" in o else o[0]["state"] for o in optim]
        assert states[0].keys() == states[1].keys() and states[0]
        for i in states[0]:
            for k, v in states[0][i].items():  # Adam's step count and moments did not move
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(states[1][i][k])), (
                    rank,
                    i,
                    k,
                )

    # Same run_name, twice the steps: resumes at step 5 on the 10-step schedule (constant here),
    # into its own output directory (steps is in the hash); the 5-step bundle is left as it was.
    first_stamp = (first / "model.safetensors").stat().st_mtime_ns
    with _nan_loss_at(NAN_STEP):
        second = train(_cfg(tmp_path, dataset, *ZERO2, *named))
    assert second != first and (first / "DONE").is_file()
    assert (first / "model.safetensors").stat().st_mtime_ns == first_stamp and load_bundle(first)[
        2
    ]["steps"] == 5
    meta = load_bundle(second)[2]
    assert (meta["steps"], meta["resumed_from_step"], meta["skipped_updates"]) == (10, 5, 1)
    assert math.isfinite(meta["final_loss"])
    _assert_same_weights(zero2_uninterrupted, second)


@pytest.mark.slow
def test_finetune_from_hf_gpt2_dir_learns_completions(pretrained, dataset, tmp_path):
    from gptcore.hf import export_gpt2

    _, parent = pretrained
    parent_model, tok, _ = load_bundle(parent)
    hf_dir = export_gpt2(parent_model, tmp_path / "hf", tok)
    cfg = _cfg(
        tmp_path,
        dataset,
        f"finetune.init={hf_dir}",
        "finetune.steps=30",
        "finetune.lr=3e-3",
        "finetune.zero_stage=1",
        "finetune.precision=bf16",
        "finetune.compile=true",
        "finetune.micro_batch_size=8",
        "finetune.eval_every=30",
        "finetune.checkpoint_every=30",
        stage="finetune",
    )
    bundle = train(cfg, "finetune")
    model, _, meta = load_bundle(bundle)
    assert meta["stage"] == "finetune" and meta["parent"]["source"] == str(hf_dir.resolve())
    assert (
        Path(meta["parent"]["bundle"]).parent.name == "import"
    )  # imported once, into <workdir>/import/<hash>/
    assert meta["train_config"]["compile"] is True
    # bf16 training exports the fp32 master weights, not their bf16 rounding.
    w = model.blocks[0].mlp.c_fc.weight
    assert not torch.equal(w, w.bfloat16().float())

    # Scored on windows the run trained on (its first 30 steps of 8, from the stream of seed 0): the
    # first windows of the split were used before, and how many of them a 240-sample run happens to
    # draw depends on the batch order (5 of 16 in the old order, 2 in the current one).
    sft = TokenWindows(dataset, "sft", model.config.context_length)
    batch = sft.batch(sft.window_ids(cfg.finetune.seed, 0, 30 * 8)[:64])
    with torch.no_grad():
        before = float(compute_loss(parent_model, batch, torch.device("cpu")))
        after = float(compute_loss(model, batch, torch.device("cpu")))
    assert after < before - 0.1, (before, after)


@pytest.mark.slow
def test_repeated_bad_updates_stop_the_run_with_a_clear_error(ray_local, dataset, tmp_path):
    # A spike factor below 1 flags every step once a running mean exists: the first step trains,
    # the next ones are skipped (no optimizer update under ZeRO-2), the third in a row stops it.
    cfg = _cfg(
        tmp_path,
        dataset,
        "pretrain.zero_stage=2",
        "pretrain.steps=10",
        "pretrain.loss_spike_factor=0.5",
        "pretrain.max_skipped_updates=3",
        "pretrain.checkpoint_every=10",
        "pretrain.eval_every=10",
        "pretrain.micro_batch_size=4",
    )
    # Under the default max_failures Ray restarts the group once; it finds the recorded stop and
    # returns, and the error is the loop's own (not "restarts exhausted" after three more tries).
    assert cfg.pretrain.max_failures > 0
    with pytest.raises(
        RuntimeError,
        match=r"^training stopped at step \d+: 3 consecutive updates had a NaN/inf loss",
    ):
        train(cfg)
    p = prepare(cfg)
    assert not (p.output_dir / "DONE").exists()
    assert resume_step(p.storage_path, p.run_name) is None  # checkpoint_every=10: none was written
    assert not (
        Path(p.storage_path) / p.run_name / "gptflow_stopped.txt"
    ).exists()  # taken by the driver


def test_init_from_a_registered_model_alias(dataset, tmp_path, monkeypatch):
    """`models:/NAME@ALIAS` resolves through MLflow to the bundle it was registered from."""
    from mlflow.tracking import MlflowClient

    # mlflow.set_tracking_uri (an earlier tracked run in this process) exports MLFLOW_TRACKING_URI,
    # which would win over this test's tracking.uri.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    from flows.workdir import sha256_file
    from gptcore import save_bundle

    tok = Tokenizer.load(dataset / "tokenizer.json")
    bundle = save_bundle(
        tmp_path / "b", GPT(preset("tiny", vocab_size=tok.vocab_size, context_length=64)), tok
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("registry", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(bundle), "model")
    client.create_registered_model("tiny-docs")
    version = client.create_model_version(
        "tiny-docs", f"{run.info.artifact_uri}/model", run.info.run_id
    )
    client.set_registered_model_alias("tiny-docs", "champion", version.version)

    cfg = _cfg(
        tmp_path,
        dataset,
        "finetune.init=models:/tiny-docs@champion",
        f"tracking.uri={uri}",
        stage="finetune",
    )
    p = prepare(cfg, "finetune")
    assert p.parent == {
        "uri": "models:/tiny-docs@champion",
        "model_sha256": sha256_file(bundle / "model.safetensors"),
    }
    assert p.gpt_config["context_length"] == 64 and Path(p.init_bundle).is_relative_to(
        tmp_path.resolve()
    )
    # planning resolves the alias to a version (a moved alias re-runs the step): an unknown one is
    # named there
    with pytest.raises(ValueError, match="model .tiny-docs. has no alias .nobody."):
        prepare(
            _cfg(
                tmp_path,
                dataset,
                "finetune.init=models:/tiny-docs@nobody",
                f"tracking.uri={uri}",
                stage="finetune",
            ),
            "finetune",
        )
