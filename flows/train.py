"""Training stage, driver side: ``train(cfg, stage) -> bundle directory`` for pretraining and fine-tuning.

What it is: everything before and after the workers. It checks the config and the data before any
worker starts (missing or corrupt shards, tokenizer/model vocabulary mismatch, a context the data
cannot fill, a GPU that is not there, ...), resolves the initial model, generates the DeepSpeed config
from the typed :class:`~flows.config.TrainConfig`, opens the stage's MLflow run, runs a Ray Train
``TorchTrainer`` over flows/train_loop.py, and marks the output bundle ``<workdir>/<stage>/<hash>/``
done. A finished output is returned without training.

What it is not: the loop itself (flows/train_loop.py) or the data reader (flows/train_data.py).
Fine-tuning is not a second code path: it is this stage with ``stage="finetune"``, an ``init`` model
and the ``sft`` split, whose loss mask the loop applies.

Resuming. The Ray run ``<storage_path>/<run_name>`` is the "place" of a run: a fit under a name that
already holds checkpoints resumes from the latest one (Ray Train's behaviour). The default name is
``<stage>-<hash>``, so re-running a stopped config resumes it and nothing else. Resuming *into more
steps* ("run N steps, then 2N in the same place") takes an explicit ``run_name``: ``steps`` is part of
the output hash, so the 2N run writes its own bundle directory and the N-step bundle stays as it was.
The resumed part follows the 2N run's lr schedule from step N on (the schedule is a function of the
step and the run's total steps; the loop recomputes the lr on resume), so a schedule that depends on
the total steps (cosine decay to ``min_lr_ratio``) gives a different result than an uninterrupted 2N
run; with a schedule that does not (``min_lr_ratio=1``) the result is the same, to the bit on CPU.
Everything else that determines the weights must match the run being resumed: :func:`check_resume`
refuses a different model, data, optimizer or schedule setting under the same name before any worker
starts (local storage; an ``s3://`` storage path is not checked).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.config import ConfigError, PipelineConfig, TrainConfig, flatten, stable_hash, to_dict
from flows.outputs import is_done, mark_done, sha256_file, stage_dir
from flows.train_data import DataError, DatasetInfo, check_dataset

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")
BUNDLE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "metadata.json")
# Steps after each (re)start left out of the steady-state throughput: allocator and thread-pool warm-up.
WARMUP_TIMING_STEPS = 3


@dataclass(frozen=True)
class Plan:
    """Everything the driver decided before starting workers (all JSON-serialisable)."""

    stage: str
    train: TrainConfig
    gpt_config: dict[str, Any]
    dataset: DatasetInfo
    split: str
    eval_split: bool
    init_bundle: str | None
    parent: dict[str, Any] | None
    key: str
    output_dir: Path
    run_name: str
    storage_path: str
    deepspeed_config: dict[str, Any]


# --------------------------------------------------------------------------- DeepSpeed config


def deepspeed_config(tc: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config for a training config: generated, never a hand-kept JSON file.

    The optimizer section appears only with ZeRO offload (which needs DeepSpeed's CPU Adam); otherwise
    the loop passes torch's AdamW as a client optimizer and DeepSpeed wraps it.
    """
    if tc.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage={tc.zero_stage!r} is invalid: must be one of 0, 1, 2, 3")
    if tc.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision={tc.precision!r} is invalid: must be fp32, bf16 or fp16")
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    if tc.zero_stage >= 1 and tc.use_gpu:
        zero.update({"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 5e8})
    if tc.zero_stage == 3:
        # Lets save_16bit_model / consolidation gather full weights for the exported bundle.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": tc.use_gpu}
    warmup = max(min(tc.warmup_steps, tc.steps), 1)  # a warmup longer than the run never reaches lr
    config: dict[str, Any] = {
        "train_batch_size": tc.micro_batch_size * tc.grad_accum * tc.num_workers,
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": tc.precision == "bf16"},
        "fp16": {"enabled": tc.precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 500},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": tc.steps,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
                # The linear warmup starts at lr/warmup rather than 0, so step 1 is not wasted.
                "warmup_min_ratio": 1.0 if tc.warmup_steps == 0 else 1.0 / (warmup + 1),
                "cos_min_ratio": tc.min_lr_ratio,
            },
        },
        "steps_per_print": 1 << 30,  # the loop logs its own metrics
        "wall_clock_breakdown": False,
    }
    if tc.offload_optimizer:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": tc.lr, "betas": [tc.beta1, tc.beta2], "eps": 1e-8, "weight_decay": tc.weight_decay},
        }
    return config


# --------------------------------------------------------------------------- pre-flight


def stage_config(cfg: PipelineConfig, stage: str) -> TrainConfig:
    if stage not in STAGES:
        raise ConfigError(f"stage={stage!r} is invalid: must be one of {', '.join(STAGES)}")
    return getattr(cfg, stage)


def resolve_init(init: str, cfg: PipelineConfig, stage: str) -> tuple[Path, dict[str, Any]]:
    """A local bundle directory for `init` (a bundle dir, models:/... URI, or HF GPT-2 dir) and its lineage."""
    cache = Path(cfg.workdir) / stage / "init"
    if init.startswith("models:/"):
        from flows.tracking import download_model

        dst = cache / stable_hash(init)
        shutil.rmtree(dst, ignore_errors=True)  # an alias may point at a new version since last time
        downloaded = download_model(init, dst, cfg.tracking, cfg.workdir)
        bundle = _find_bundle(downloaded)
        if bundle is None:
            raise ConfigError(f"{stage}.init={init!r}: the downloaded model in {downloaded} holds no bundle "
                              f"({', '.join(BUNDLE_FILES)})")
        return bundle, {"uri": init, "model_sha256": sha256_file(bundle / "model.safetensors")}
    path = Path(init)
    if not path.is_dir():
        raise ConfigError(f"{stage}.init={init!r}: no such directory (and not a models:/NAME@ALIAS or "
                          "models:/NAME/VERSION URI)")
    bundle = _find_bundle(path)
    if bundle is not None and bundle == path:
        meta = {"bundle": str(path.resolve()), "model_sha256": sha256_file(path / "model.safetensors")}
        return path, meta
    if (path / "config.json").is_file():  # a Hugging Face GPT-2 directory: import it once, as a bundle
        from gptcore import Tokenizer, save_bundle
        from gptcore.hf import import_gpt2

        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if weights is None:
            raise ConfigError(f"{stage}.init={init!r}: {path} has config.json but no model.safetensors or pytorch_model.bin")
        digest = sha256_file(weights)
        dst = cache / f"hf-{digest[:16]}"
        if not is_done(dst):
            try:
                model = import_gpt2(path)
                tokenizer = Tokenizer.load(path)
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"{stage}.init={init!r}: cannot import as GPT-2: {e}") from e
            save_bundle(dst, model, tokenizer, {"imported_from": str(path.resolve()), "source_sha256": digest})
            mark_done(dst)
        return dst, {"hf_gpt2": str(path.resolve()), "model_sha256": sha256_file(dst / "model.safetensors")}
    if bundle is not None:
        return bundle, {"bundle": str(bundle.resolve()), "model_sha256": sha256_file(bundle / "model.safetensors")}
    raise ConfigError(f"{stage}.init={init!r}: {path} is neither a model bundle ({', '.join(BUNDLE_FILES)}) "
                      "nor a Hugging Face GPT-2 directory (config.json + weights)")


def _find_bundle(root: Path) -> Path | None:
    """`root` itself if it holds the bundle files, else the shallowest folder under it that does."""
    candidates = [root] + sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts))
    for d in candidates:
        if all((d / f).is_file() for f in BUNDLE_FILES):
            return d
    return None


def plan(cfg: PipelineConfig, stage: str = "pretrain") -> Plan:
    """Check config, initial model and data; decide the model, DeepSpeed config and output path.

    Raises ConfigError / DataError before any worker starts. Reads files; starts nothing.
    """
    from gptcore import GPTConfig, Tokenizer, preset

    tc = stage_config(cfg, stage)
    if not tc.data:
        raise ConfigError(f"{stage}.data is empty: give the dataset directory (--data DIR or --set {stage}.data=DIR)")
    if stage == "finetune" and not tc.init:
        raise ConfigError("finetune.init is empty: fine-tuning starts from a model (--init BUNDLE_DIR, "
                          "models:/NAME@ALIAS or a Hugging Face GPT-2 directory)")
    if tc.precision == "fp16" and not tc.use_gpu:
        raise ConfigError(f"{stage}.precision='fp16' needs GPUs (use_gpu: true); on CPU use bf16 or fp32")
    if tc.offload_optimizer and tc.zero_stage == 0:
        raise ConfigError(f"{stage}.offload_optimizer=true needs zero_stage 1, 2 or 3 (got 0)")
    ds_config = deepspeed_config(tc)

    mc = cfg.model
    init_bundle, parent = (None, None)
    if tc.init:
        init_bundle, parent = resolve_init(tc.init, cfg, stage)
        gpt = GPTConfig.from_dict(json.loads((init_bundle / "config.json").read_text(encoding="utf-8")))
        if mc.context_length not in (None, gpt.context_length):
            raise ConfigError(f"model.context_length={mc.context_length} differs from the init model's "
                              f"{gpt.context_length} ({init_bundle / 'config.json'}); leave it unset")
        gpt = dataclasses.replace(gpt, dropout=mc.dropout, activation_checkpointing=mc.activation_checkpointing)
        model_tok = Tokenizer.load(init_bundle / "tokenizer.json")
    else:
        try:
            gpt = preset(mc.preset)
        except ValueError as e:
            raise ConfigError(f"model.preset: {e}") from None
        model_tok = None

    split = "sft" if stage == "finetune" else "train"
    data_root = Path(tc.data)
    from flows.train_data import read_manifest

    manifest = read_manifest(data_root)
    val_entry = manifest["splits"].get("val") or {}
    eval_split = bool(val_entry.get("shards"))
    T = mc.context_length or gpt.context_length
    info = check_dataset(data_root, (split, "val") if eval_split else (split,), T, world=tc.num_workers)

    data_tok_path = data_root / "tokenizer.json"
    data_tok = Tokenizer.load(data_tok_path)
    if data_tok.vocab_size != info.vocab_size:
        raise DataError(f"{data_tok_path}: {data_tok.vocab_size} tokens, but {data_root / 'manifest.json'} says "
                        f"vocab_size={info.vocab_size}")
    if model_tok is not None:
        if model_tok.sha256() != data_tok.sha256():
            raise DataError(
                f"tokenizer mismatch: the data in {data_root} was tokenized with {data_tok_path} "
                f"({data_tok.vocab_size} tokens) but the init model uses {init_bundle / 'tokenizer.json'} "
                f"({model_tok.vocab_size} tokens); preprocess with data.tokenizer_path={init_bundle}"
            )
        if gpt.vocab_size != data_tok.vocab_size:
            raise DataError(f"{init_bundle / 'config.json'}: vocab_size={gpt.vocab_size} does not match the data's "
                            f"tokenizer ({data_tok.vocab_size} tokens, {data_tok_path})")
    else:
        gpt = dataclasses.replace(gpt, vocab_size=data_tok.vocab_size, context_length=T, dropout=mc.dropout,
                                  activation_checkpointing=mc.activation_checkpointing)

    # Hash what determines the weights: the stage config (paths replaced by content identities),
    # the model shape, the data manifest and the initial model.
    hashed = {k: v for k, v in to_dict(tc).items() if k not in ("data", "init", "run_name", "storage_path")}
    key = stable_hash(stage, hashed, gpt.to_dict(), info.manifest_sha256, parent)
    workdir = Path(cfg.workdir)
    storage = tc.storage_path or str((workdir / "ray_results").resolve())
    return Plan(
        stage=stage, train=tc, gpt_config=gpt.to_dict(), dataset=info, split=split, eval_split=eval_split,
        init_bundle=str(init_bundle.resolve()) if init_bundle else None, parent=parent, key=key,
        output_dir=stage_dir(workdir, stage, key).resolve(), run_name=tc.run_name or f"{stage}-{key}",
        storage_path=storage, deepspeed_config=ds_config,
    )


def check_cluster(tc: TrainConfig, stage: str, local: bool) -> None:
    """The Ray cluster can place the workers (GPUs exist; on a local instance, enough CPUs)."""
    import ray

    res = ray.cluster_resources()
    if tc.use_gpu and res.get("GPU", 0) < tc.num_workers:
        raise ConfigError(f"{stage}.use_gpu=true with num_workers={tc.num_workers}, but the Ray cluster has "
                          f"{int(res.get('GPU', 0))} GPUs; set use_gpu: false or use a GPU cluster")
    need = tc.num_workers * tc.cpus_per_worker
    if local and res.get("CPU", 0) < need:
        # A local instance never grows; Ray Train would wait forever for the missing CPUs.
        raise ConfigError(f"{stage}: num_workers * cpus_per_worker = {need} CPUs, but the local Ray instance "
                          f"has {int(res.get('CPU', 0))}; lower num_workers or cpus_per_worker")


# --------------------------------------------------------------------------- resuming by name

RESUME_FILE = "gptflow_resume.json"
# TrainConfig fields a resumed run may change: they do not enter the weights (what is logged, kept
# or retried, where it runs) -- plus `steps`, which is what resuming into more steps changes.
_RESUMABLE_CHANGES = ("steps", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                      "max_failures", "max_skipped_updates", "peak_flops_per_device", "sample_prompts",
                      "sample_tokens", "fail_at_step", "cpus_per_worker", "global_batch_size")


def resume_identity(p: Plan) -> dict[str, Any]:
    """What a run's checkpoints depend on, beside its step count: must match to resume under its name."""
    train = {k: v for k, v in to_dict(p.train).items()
             if k not in _RESUMABLE_CHANGES and k not in ("data", "init", "run_name", "storage_path")}
    return {"stage": p.stage, "train": train, "model": p.gpt_config,
            "dataset_manifest_sha256": p.dataset.manifest_sha256, "parent": p.parent}


def check_resume(p: Plan) -> None:
    """Refuse to resume the run ``<storage_path>/<run_name>`` with a config it was not trained with.

    Ray resumes any run under a re-used name; without this check a changed lr, model or dataset would
    silently continue from weights trained otherwise, under an output hash that does not say so.
    Records the identity for the next call. Local storage only (no check for s3://... paths).
    """
    if "://" in p.storage_path:
        return
    path = Path(p.storage_path) / p.run_name / RESUME_FILE
    ours = json.loads(json.dumps(resume_identity(p)))
    if path.is_file():
        theirs = json.loads(path.read_text(encoding="utf-8"))
        if theirs != ours:
            a, b = flatten(ours), flatten(theirs)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ConfigError(
                f"{p.stage}.run_name={p.run_name!r}: {path.parent} holds a run trained with a different "
                f"{', '.join(diff)}; resuming it would continue from those weights. Use another run_name "
                f"(only {', '.join(_RESUMABLE_CHANGES)} may change when resuming)"
            )
        reached = _latest_checkpoint_step(path.parent)
        if reached is not None and reached > p.train.steps:
            # Caught here, before any worker starts; the training loop refuses it too (remote storage).
            raise ConfigError(
                f"{p.stage}.steps={p.train.steps}: run {p.run_name!r} in {path.parent} has a checkpoint at "
                f"step {reached}; a run resumes into the same or more steps, never fewer. Use steps >= "
                f"{reached} or another run_name"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ours, indent=2, sort_keys=True) + "\n", encoding="utf-8")


_CHECKPOINT_PREFIX = "checkpoint_"


def checkpoint_dir_name(step: int) -> str:
    """Name of the resume checkpoint the loop reports at `step` (in the Ray run directory)."""
    return f"{_CHECKPOINT_PREFIX}{step:08d}"


def _latest_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the newest resume checkpoint in a Ray run directory, if any."""
    steps = [int(d.name.removeprefix(_CHECKPOINT_PREFIX)) for d in run_dir.glob(f"{_CHECKPOINT_PREFIX}*")
             if d.is_dir() and d.name.removeprefix(_CHECKPOINT_PREFIX).isdigit()]
    return max(steps, default=None)


# --------------------------------------------------------------------------- the stage


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def loop_config(p: Plan, run_id: str | None, uri: str | None) -> dict[str, Any]:
    """The plain dict each worker receives (everything it needs; nothing read from the environment)."""
    from gptcore import GPTConfig

    tc = p.train
    gpt = GPTConfig.from_dict(p.gpt_config)
    return {
        **{k: getattr(tc, k) for k in (
            "steps", "micro_batch_size", "grad_accum", "use_gpu", "cpus_per_worker", "zero_stage", "precision",
            "compile", "lr", "weight_decay", "beta1", "beta2", "eval_every", "eval_batches", "checkpoint_every",
            "loss_spike_factor", "max_skipped_updates", "peak_flops_per_device", "seed", "sample_tokens",
            "fail_at_step")},
        "sample_prompts": list(tc.sample_prompts),
        "stage": p.stage, "gpt_config": p.gpt_config, "flops_per_token": gpt.flops_per_token(),
        "dataset": p.dataset.path, "split": p.split, "eval_split": p.eval_split, "init_bundle": p.init_bundle,
        "deepspeed_config": p.deepspeed_config, "output_dir": str(p.output_dir),
        "run_name": p.run_name, "storage_path": p.storage_path,
        "fail_marker": str(Path(p.storage_path) / p.run_name / f"injected_failure_step{tc.fail_at_step}")
        if tc.fail_at_step >= 0 and "://" not in p.storage_path else "",
        "run_id": run_id, "tracking_uri": uri, "warmup_timing_steps": WARMUP_TIMING_STEPS,
        "bundle_metadata": {
            "stage": p.stage, "config_hash": p.key, "git_commit": _git_commit(),
            "dataset": p.dataset.path, "dataset_manifest_sha256": p.dataset.manifest_sha256,
            "tokenizer_sha256": p.dataset.tokenizer_sha256, "parent": p.parent,
            "train_config": to_dict(tc), "deepspeed_config": p.deepspeed_config,
        },
    }


def train(cfg: PipelineConfig, stage: str = "pretrain") -> Path:
    """Train (or fine-tune) and return the model bundle directory ``<workdir>/<stage>/<hash>/``."""
    p = plan(cfg, stage)
    if is_done(p.output_dir):
        log.info("%s: %s is done; reusing it", stage, p.output_dir)
        return p.output_dir

    from flows.cluster import ensure_ray
    from flows.tracking import stage_run

    check_resume(p)
    ensure_ray(cfg.cluster)
    check_cluster(p.train, stage, local=not (os.environ.get("RAY_ADDRESS") or cfg.cluster.address))
    params = {"train": to_dict(p.train), "model": p.gpt_config, "output_dir": str(p.output_dir),
              "dataset_manifest_sha256": p.dataset.manifest_sha256}
    with stage_run(cfg.tracking, cfg.workdir, stage, params) as tracker:
        tracker.set_tags({"gptflow.ray_run_name": p.run_name, "gptflow.storage_path": p.storage_path,
                          "gptflow.output_dir": str(p.output_dir), "gptflow.config_hash": p.key})
        tracker.log_dict(p.deepspeed_config, "deepspeed_config.json")
        tracker.log_dict({"stage": stage, "train": to_dict(p.train), "model": p.gpt_config,
                          "parent": p.parent}, "train_config.json")
        tracker.log_input_dataset(Path(p.dataset.path).name, p.dataset.path, p.dataset.manifest_sha256,
                                  context="training", profile=p.dataset.split_tokens)
        metrics = run_trainer(p, loop_config(p, tracker.run_id, tracker.uri))
        missing = [f for f in BUNDLE_FILES if not (p.output_dir / f).is_file()]
        if missing:
            raise RuntimeError(f"training finished but the bundle in {p.output_dir} lacks {', '.join(missing)}")
        tracker.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, int | float)},
                            step=p.train.steps)
        tracker.log_artifacts(p.output_dir, "bundle")
        mark_done(p.output_dir, {"stage": stage, "config_hash": p.key, "run_id": tracker.run_id,
                                 "ray_run_name": p.run_name, "metrics": metrics})
    log.info("%s: bundle written to %s", stage, p.output_dir)
    return p.output_dir


def run_trainer(p: Plan, loop_cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the TorchTrainer; returns the last checkpointed report's metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from flows.train_loop import train_loop_per_worker

    tc = p.train
    resources = {"CPU": tc.cpus_per_worker} | ({"GPU": 1} if tc.use_gpu else {})
    env = {"OMP_NUM_THREADS": str(tc.cpus_per_worker), "TOKENIZERS_PARALLELISM": "false"}
    if not tc.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # no probing for CUDA/XPU on CPU workers
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=p.run_name, storage_path=p.storage_path,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        raise RuntimeError(
            f"{p.stage} run {p.run_name!r} failed ({type(e).__name__}: {e}). Its resume checkpoints are under "
            f"{p.storage_path}/{p.run_name}; running the same config again resumes from the last one"
        ) from e
    return dict(result.metrics or {})
