"""The DeepSpeed config of a training run, generated from the typed TrainConfig (never hand-kept
JSON)."""

from __future__ import annotations

from typing import Any

from flows.config import PRECISIONS, ConfigError, TrainConfig

# DeepSpeed's default communication buckets, in elements. ZeRO allocates them whole (ZeRO-3's
# gradient bucket of 5e8 fp32 elements is 1.9 GiB per worker), so a model smaller than a bucket gets
# buckets of its own size: the same communication, without gigabytes of empty buffer.
REDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000
# ZeRO-3's cap on gathered parameters (elements) before it stops prefetching: DeepSpeed's default,
# written into the config because the capacity planner's gathered-parameter term reads it.
MAX_LIVE_PARAMETERS = 1_000_000_000


def bucket_sizes(num_params: int | None) -> tuple[int, int]:
    """(reduce bucket, ZeRO-3 prefetch bucket) in elements for a model of `num_params`
    parameters."""
    if num_params is None:
        return REDUCE_BUCKET, PREFETCH_BUCKET
    return min(REDUCE_BUCKET, num_params), min(PREFETCH_BUCKET, num_params)


def deepspeed_config(tc: TrainConfig, num_params: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for a training config: generated, never a hand-kept JSON file.

    The optimizer section appears only with ZeRO offload (which needs DeepSpeed's CPU Adam);
    otherwise the loop passes torch's AdamW as a client optimizer and DeepSpeed wraps it. Given the
    model's parameter count, ZeRO's buckets are no larger than the model.
    """
    if tc.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage={tc.zero_stage!r} is invalid: must be one of 0, 1, 2, 3")
    if tc.precision not in PRECISIONS:
        raise ConfigError(
            f"precision={tc.precision!r} is invalid: must be one of {', '.join(PRECISIONS)}"
        )
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    reduce_bucket, prefetch_bucket = bucket_sizes(num_params)
    if tc.zero_stage >= 1:
        zero["reduce_bucket_size"] = reduce_bucket
        if tc.use_gpu:
            zero.update({"overlap_comm": True, "contiguous_gradients": True})
    if tc.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = prefetch_bucket
        zero["stage3_max_live_parameters"] = MAX_LIVE_PARAMETERS
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
        # fp32 weights, gradients and optimizer state; matmuls in bf16 under torch.autocast
        "torch_autocast": {"enabled": tc.precision == "bf16-autocast", "dtype": "bfloat16"},
        "fp16": {
            "enabled": tc.precision == "fp16",
            "initial_scale_power": 16,
            "loss_scale_window": 500,
        },
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
            "params": {
                "lr": tc.lr,
                "betas": [tc.beta1, tc.beta2],
                "eps": 1e-8,
                "weight_decay": tc.weight_decay,
            },
        }
    return config
