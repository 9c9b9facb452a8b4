"""The model, pretrain, finetune and distill sections: which GPT to build and how one training run
goes (pretraining, fine-tuning and distillation are one loop). Read by flows/train/; composed into
the pipeline's config by flows/config.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from flows.configlib import NAMES_INPUT, check, check_finite, hashed_only_by, unhashed

PRECISIONS = ("fp32", "bf16", "bf16-autocast", "fp16")

_PLACE = "where resume state lives, not what the run makes"


@dataclass(frozen=True)
class ModelConfig:
    """Which GPT to build: a pretrained base, or a gptcore preset plus a few overrides (vocab_size
    comes from the tokenizer)."""

    base: str = unhashed("", why="the base enters as the import step's output, by its content")
    """A pretrained base model to start from: what `gptflow import` takes
    (builtin:smollm2-135m-instruct, a Hugging Face directory, a .gguf file), a bundle directory or
    models:/NAME@ALIAS. The pipeline then imports it (step `import`), tokenizes with its tokenizer
    and chat template, and pretraining continues from it. Empty: a GPT from scratch (`preset`) with
    a BPE vocabulary trained on the corpus."""
    preset: str = "tiny"
    """A name in gptcore.PRESETS: tiny, small, gpt2-124m, gpt2-350m, gpt2-774m, gpt2-1.5b (GPT-2);
    tiny-llama, smollm2-135m, smollm2-360m, llama-3.2-1b (the Llama family)."""
    context_length: int | None = None
    """Override the preset's context length; with `base` (or an init model): the training windows,
    capped by the model's own context length."""
    dropout: float = 0.0
    """Dropout probability in attention and MLP outputs."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""

    def __post_init__(self) -> None:
        check(
            self.context_length is None or self.context_length >= 1,
            "context_length",
            self.context_length,
            ">= 1 (or empty for the preset's)",
        )
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)")


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (gptcore/lora.py): train r x (in + out) numbers per targeted matrix instead
    of the matrix; they are merged into the weights when the bundle is written. Off when r is 0."""

    r: int = 0
    """Rank of the adapters; 0 trains every weight (full fine-tuning)."""
    alpha: float = 16.0
    """Scale of the update: alpha / r times B A."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    targets: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    """Suffixes of the linear layers adapted: attention's fused q/k/v and output, the MLP's in and
    out."""

    def __post_init__(self) -> None:
        check(self.r >= 0, "r", self.r, ">= 0 (0: off)")
        check(math.isfinite(self.alpha) and self.alpha > 0, "alpha", self.alpha, "> 0")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)")
        check(bool(self.targets), "targets", self.targets, "at least one layer name suffix")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: pretraining from scratch, or fine-tuning from a model (same loop)."""

    data: str = unhashed("", why=NAMES_INPUT)
    """Dataset directory from preprocessing; empty means the pipeline's own preprocess output."""
    init: str | None = unhashed(None, why=NAMES_INPUT)
    """Start from: a bundle directory, models:/NAME@ALIAS or models:/NAME/VERSION, or what
    `gptflow import` takes (builtin:NAME, a Hugging Face directory, a .gguf file), imported once
    into <workdir>/import/<hash>/."""
    steps: int = 200
    """Optimizer steps; 0 skips the step (pretraining from a model.base: fine-tune the base
    itself)."""
    micro_batch_size: int = 8
    """Sequences per worker per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: int | None = None
    """If set, must equal micro_batch_size * grad_accum * num_workers (checked before any worker
    starts)."""
    num_workers: int = 1
    """Ray Train workers (one process each)."""
    use_gpu: bool = False
    """One GPU per worker (nccl); CPU workers use gloo."""
    cpus_per_worker: int = 1
    """CPUs reserved per worker (also its torch thread count on CPU)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    precision: Literal["fp32", "bf16", "bf16-autocast", "fp16"] = "fp32"
    """Training precision: fp32; bf16 or fp16 weights (DeepSpeed keeps fp32 master weights); or
    bf16-autocast: fp32 weights, gradients and all-reduce, matmuls in bf16 under torch.autocast."""
    offload_optimizer: bool = False
    """ZeRO optimizer state offload to CPU (stages 1-3)."""
    compile: bool = False
    """torch.compile the model through DeepSpeed (inductor): faster steps after a one-off compile
    (~20 s)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor, as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Gradient norm clipping; 0 disables it."""
    eval_every: int = 50
    """Validation loss, perplexity and samples every this many steps (and at the end)."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation."""
    checkpoint_every: int = 50
    """Resume checkpoint every this many steps (and at the end); also the most steps a restart after
    a lost worker repeats."""
    keep_checkpoints: int = 2
    """Resume checkpoints kept."""
    max_failures: int = 3
    """Restarts of the worker group from the latest checkpoint after a lost or failed worker
    (killed, out of memory, node gone), per fit, before the run fails; 0 fails on the first. A
    restarted run ends with the weights an uninterrupted one would have."""
    loss_spike_factor: float = 0.0
    """Skip an update whose loss exceeds this multiple of the running mean; 0 disables it."""
    max_skipped_updates: int = 5
    """Consecutive skipped updates (NaN/inf or spikes) after which the run stops with an error."""
    peak_flops_per_device: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 picks a default for the device kind."""
    sample_prompts: tuple[str, ...] = ("The", "def ")
    """Prompts whose greedy continuations are logged at each evaluation."""
    run_name: str | None = unhashed(None, why=_PLACE)
    """Ray Train run name; reusing one resumes that run from its last checkpoint."""
    seed: int = 0
    """Seed for initialisation and batch order."""
    storage_path: str = unhashed("", why=_PLACE)
    """Where resume checkpoints go (shared by all nodes: a path or s3://...); empty =
    <workdir>/ray_results."""
    sample_tokens: int = 32
    """New tokens generated per sample prompt at each evaluation."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Low-rank adapters instead of training every weight (needs an init model; ZeRO 0-2)."""

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", self.zero_stage, "one of 0, 1, 2, 3")
        # ZeRO-3 partitions every parameter, the frozen ones too, and the merge at export would need
        # them gathered beside the adapters; not supported (yet).
        check(
            not (self.lora.r and self.zero_stage == 3),
            "zero_stage",
            self.zero_stage,
            "0, 1 or 2 with lora (ZeRO-3 with LoRA adapters is not supported)",
        )
        check(self.precision in PRECISIONS, "precision", self.precision, ", ".join(PRECISIONS))
        check_finite(self)
        check(self.steps >= 0, "steps", self.steps, ">= 0 (0: skip the step)")
        for name in (
            "micro_batch_size",
            "grad_accum",
            "num_workers",
            "cpus_per_worker",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "keep_checkpoints",
            "max_skipped_updates",
        ):
            check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        for name in (
            "warmup_steps",
            "max_failures",
            "sample_tokens",
            "weight_decay",
            "grad_clip",
            "loss_spike_factor",
            "peak_flops_per_device",
            "seed",
        ):
            check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        for name in ("beta1", "beta2"):
            check(0.0 <= getattr(self, name) < 1.0, name, getattr(self, name), "in [0, 1)")
        check(self.lr > 0, "lr", self.lr, "> 0")
        check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        expected = self.micro_batch_size * self.grad_accum * self.num_workers
        check(
            self.global_batch_size in (None, expected),
            "global_batch_size",
            self.global_batch_size,
            f"micro_batch_size * grad_accum * num_workers = {expected}",
        )


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """Knowledge distillation: a smaller student GPT trained on the same shards with the training
    loop's loss replaced by
    ``alpha * CE(labels) + (1 - alpha) * temperature^2 * KL(teacher_T || student_T)``, the teacher
    run in inference mode beside the student on each worker. Every training key applies to the
    student's run; ``init`` (optional) starts the student from a model instead of from scratch."""

    enabled: bool = unhashed(False, why="whether the step runs, not what it makes")
    """Run the distill step (and evaluate, register and promote the student) in `gptflow run`."""
    teacher: str = unhashed("", why=NAMES_INPUT)
    """The teacher: a bundle directory, models:/NAME@ALIAS or models:/NAME/VERSION, or what
    `gptflow import` takes (imported once); empty = the pipeline's own final model (fine-tuned, else
    pretrained)."""
    student_preset: str = "tiny"
    """The student's architecture (gptcore preset); its vocabulary is the teacher's and the
    data's."""
    context_length: int | None = None
    """The student's context (training windows); empty = the teacher's. At most the teacher's."""
    dropout: float = 0.0
    """The student's dropout."""
    activation_checkpointing: bool = False
    """Recompute the student's block activations in backward (less memory, ~30% more compute)."""
    alpha: float = 0.5
    """Weight of the labels' cross-entropy; 1 - alpha weighs the teacher's soft targets (0: soft
    targets only)."""
    temperature: float = 1.0
    """Softmax temperature of both distributions in the KL term (> 0; higher: softer targets, more
    weight on the teacher's ranking of unlikely tokens). Measured here (README): 2 made short runs
    worse than 1."""
    split: Literal["train", "sft"] = "train"
    """Which shards the student learns on: the pretraining text, or the fine-tuning examples
    (completion tokens only, like fine-tuning); validation uses the matching held-out split."""
    registry_name: str = hashed_only_by(
        "distill_register",
        "distill_promote",
        default="",
        why="where the student is registered: only its register and promote steps read it",
    )
    """The student's registered model name; empty = "<registry.name>-student"."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "in [0, 1]")
        check(self.temperature > 0, "temperature", self.temperature, "> 0")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)")
        check(
            self.context_length is None or self.context_length >= 1,
            "context_length",
            self.context_length,
            ">= 1 (or empty for the teacher's)",
        )

    def student_model(self) -> ModelConfig:
        """The student's architecture as a model section (the context is settled against the
        teacher)."""
        return ModelConfig(
            preset=self.student_preset,
            context_length=self.context_length,
            dropout=self.dropout,
            activation_checkpointing=self.activation_checkpointing,
        )
