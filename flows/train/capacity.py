"""The capacity planner: will a GPT train on this hardware, with which ZeRO stage, and how long will
it take?

Per GPU (or per CPU worker) it estimates the memory of the model states (weights, gradients,
optimizer state) for ZeRO 0-3 with and without optimizer offload, the activations at the
configured micro-batch and context with and without activation checkpointing, whether that fits,
and the time for a token budget at a stated MFU. Parameters and FLOPs are gptcore's own counts
(GPTConfig.num_params, GPTConfig.flops_per_token).

Model states, bytes per parameter Ψ over N data-parallel ranks, mixed precision (bf16/fp16 with an
fp32 master copy and Adam), as DeepSpeed accounts them (its estimate_zero2/3_model_states_mem_needs
agree; tests hold it to them):

    ZeRO-0  weights 2      gradients 2 + 4       optimizer 4 + 8      (all replicated: 20Ψ)
    ZeRO-1  weights 2      gradients 2 + 4/N     optimizer 12/N
    ZeRO-2  weights 2      gradients 6/N         optimizer 12/N       (2Ψ + 18Ψ/N)
    ZeRO-3  weights 2/N + 4·(largest layer)   gradients 4/N   optimizer 12/N   (18Ψ/N + 4 L_max)

fp32 (and bf16-autocast, whose weights are fp32): weights 4, gradients 4, optimizer 8 (Adam's two
moments) without ZeRO, where the weights are the master copy; with ZeRO 1-3 DeepSpeed's optimizer
keeps an fp32 copy of its partition besides (optimizer 12/N), and the rest divides by N as above.
Offloading the optimizer moves the fp32 states and gradients to CPU memory (reported per node).

Communication buffers (DeepSpeed's gradient buckets, sized as flows/train/ds_config.py sets them)
are a column of their own. ZeRO-3 reduce-scatters its gradient bucket of B elements (g bytes each)
through DeepSpeed's reduce_scatter_coalesced, which interleaves the bucket's per-rank chunks into a
second flat tensor of the bucket's size, and on CPU gloo's reduce-scatter works on a third full
copy:

    ZeRO-3 buffers    2·g·B on GPUs, 3·g·B on CPU workers (gloo)

ZeRO-3's gathered parameters are a column of their own too: DeepSpeed keeps every parameter that its
prefetcher gathered in the forward pass until that parameter's last use in the backward pass (a
prefetched parameter is never released in between), and prefetches until max_live_parameters
elements are gathered. So from the second step on, at the turn from forward to backward,
a rank holds

    ZeRO-3 gathered   w·min(Ψ, max_live_parameters + prefetch bucket)

with w the bytes of a weight (2 in bf16/fp16, 4 in fp32): the whole model for any Ψ up to 1e9 at
DeepSpeed's default max_live_parameters, which ds_config.py writes out. DeepSpeed's estimator
counts only 4·(largest layer) for this, in the weights, which stay as it computes them. Measured
with 2 CPU ranks (DeepSpeed 0.19.8): gpt2-124m at vocab 512, 85.5M parameters, had 83.1M gathered at
the end of the forward, also with stage3_max_reuse_distance 2e7; a 7.3M-parameter model had 2.6M
with max_live_parameters 2e6 and a prefetch bucket of 5e5. The buffers and the gathered parameters
are counted as live at once: a model larger than the bucket reduce-scatters it while parameters are
still gathered; in the measured run (one bucket for the whole model) the gathered parameters are
freed just before its reduce-scatter, but glibc keeps the freed heap pages (it returns only the top
of the heap), as a GPU's caching allocator would keep its blocks.

Not a term: the full fp32 model (4Ψ) that every rank builds before DeepSpeed partitions it for
ZeRO-3. Measured, it is freed while deepspeed.initialize partitions it (RSS after initialize equals
the live tensors), before the training peak. Nor the export's consolidated state dict (4Ψ on rank
0, after training; the measured peak is taken before it).

Activations per micro-batch, b sequences of s tokens, width h, L layers (Korthikanti et al. 2022,
"Reducing Activation Recomputation", without dropout masks and with fused attention, so no s²
scores are kept): 32·s·b·h bytes per layer at 16-bit, twice that in fp32; with activation
checkpointing, each block keeps only its input (s·b·h values) and one block is recomputed at a time.
Plus the embeddings' output and the final LayerNorm's (the fused chunked loss keeps no logits).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from gptcore import GPTConfig

GIB = 1024**3
HALF = ("bf16", "fp16")  # DeepSpeed mixed precision: 16-bit weights and an fp32 master copy
# Memory a training process needs beyond its model states and activations: the CUDA context and
# allocator slack on a GPU; on a CPU worker the interpreter, torch, DeepSpeed and Ray (measured
# here).
GPU_RESERVE_GIB = 2.0
CPU_WORKER_BASE_GIB = 0.8


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_mem_gib: float = 80.0
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100/H200 SXM: 989)."""
    mfu: float = 0.4
    """Model FLOPs utilisation assumed for the time estimate."""

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class Estimate:
    zero_stage: int
    offload_optimizer: bool
    activation_checkpointing: bool
    params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    gathered: float
    """ZeRO-3's parameters gathered at once (0 for ZeRO 0-2, whose weights are all local anyway)."""
    cpu_offload_per_node: float
    budget: float

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.buffers + self.gathered + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


def largest_layer_params(cfg: GPTConfig) -> int:
    """The largest module's parameters (what ZeRO-3 gathers at once): the tied token embedding/LM
    head, the position embedding, or a block's MLP projection, whichever is widest."""
    d = cfg.d_model
    return max(cfg.vocab_size * d, cfg.context_length * d, d * 4 * d + 4 * d * int(cfg.bias))


def model_states(
    params: int,
    largest: int,
    zero_stage: int,
    world: int,
    precision: str,
    offload_optimizer: bool = False,
    nodes: int = 1,
) -> tuple[float, float, float, float]:
    """(weights, gradients, optimizer state) bytes per rank, and bytes per node offloaded to CPU."""
    P, N = float(params), float(world)
    if precision in HALF:
        w_rep, g16, g32, master, moments = 2, 2, 4, 4, 8
    else:
        # fp32 gradients; without ZeRO the weights are the master copy, ZeRO keeps an fp32
        # partition copy
        w_rep, g16, g32, master, moments = 4, 4, 0, (4 if zero_stage else 0), 8
    optim_bytes = master + moments
    if zero_stage == 0:
        weights, grads, optim = w_rep * P, (g16 + g32) * P, optim_bytes * P
    elif zero_stage == 1:
        weights, grads, optim = w_rep * P, g16 * P + g32 * P / N, optim_bytes * P / N
    elif zero_stage == 2:
        weights, grads, optim = w_rep * P, (g16 + g32) * P / N, optim_bytes * P / N
    elif zero_stage == 3:
        # Stage 3 reduce-scatters each gradient as it is produced: a 4-byte partition is all it
        # keeps.
        weights, grads, optim = w_rep * P / N + 4 * largest, 4 * P / N, optim_bytes * P / N
    else:
        raise ValueError(f"zero_stage={zero_stage} must be 0, 1, 2 or 3")
    cpu = 0.0
    if offload_optimizer:
        if zero_stage == 0:
            raise ValueError("optimizer offload needs ZeRO 1, 2 or 3")
        ranks_per_node = N / nodes
        moved = optim + (grads if zero_stage >= 2 else g32 * P / N)
        cpu = moved * ranks_per_node
        optim = 0.0
        grads = 0.0 if zero_stage >= 2 else g16 * P
    return weights, grads, optim, cpu


def buffers(params: int, zero_stage: int, precision: str, gpu: bool) -> float:
    """DeepSpeed's communication buffers per rank, bytes, with the buckets flows/train/ds_config.py
    sets: ZeRO-0 flattens every gradient into all-reduce buckets (a copy of the gradients); ZeRO-1/2
    keep a contiguous gradient bucket (two when overlapping communication, as on GPUs); ZeRO-3 a
    gradient bucket, the interleaved copy its reduce-scatter makes, and on CPU gloo's own copy."""
    from flows.train.ds_config import bucket_sizes

    grad_bytes = 2 if precision in HALF else 4
    reduce_bucket, _ = bucket_sizes(params)
    if zero_stage == 0:
        return float(params * grad_bytes)
    if zero_stage in (1, 2):
        return float(reduce_bucket * grad_bytes * (2 if gpu else 1))
    return float(reduce_bucket * grad_bytes * (2 if gpu else 3))


def gathered(params: int, zero_stage: int, precision: str) -> float:
    """ZeRO-3's gathered parameters per rank, bytes: what its prefetcher gathers (up to
    max_live_parameters plus one prefetch bucket) stays gathered until the backward pass uses it."""
    from flows.train.ds_config import MAX_LIVE_PARAMETERS, bucket_sizes

    if zero_stage != 3:
        return 0.0
    _, prefetch_bucket = bucket_sizes(params)
    weight_bytes = 2 if precision in HALF else 4
    return float(weight_bytes * min(params, MAX_LIVE_PARAMETERS + prefetch_bucket))


def activations(cfg: GPTConfig, micro_batch: int, precision: str, checkpointing: bool) -> float:
    """Activation bytes kept for the backward pass of one micro-batch."""
    s, b, h, L = cfg.context_length, micro_batch, cfg.d_model, cfg.n_layer
    width = (
        2 if precision in HALF else 4
    )  # bytes per activation value (autocast keeps fp32 residuals)
    per_layer = 16 * s * b * h * width  # 32 sbh bytes at 16-bit
    edges = 3 * s * b * h * width  # embedding output, final LayerNorm output, a loss chunk's worth
    if checkpointing:
        return L * s * b * h * width + per_layer + edges
    return L * per_layer + edges


def estimate(
    cfg: GPTConfig,
    micro_batch: int,
    precision: str,
    zero_stage: int,
    hw: Hardware,
    offload_optimizer: bool = False,
    checkpointing: bool = False,
    budget: float | None = None,
    gpu: bool = True,
) -> Estimate:
    params = cfg.num_params()
    w, g, o, cpu = model_states(
        params,
        largest_layer_params(cfg),
        zero_stage,
        hw.world,
        precision,
        offload_optimizer,
        hw.nodes,
    )
    a = activations(cfg, micro_batch, precision, checkpointing)
    if budget is None:
        budget = (hw.gpu_mem_gib - GPU_RESERVE_GIB) * GIB
    return Estimate(
        zero_stage,
        offload_optimizer,
        checkpointing,
        params,
        w,
        g,
        o,
        a,
        buffers(params, zero_stage, precision, gpu),
        gathered(params, zero_stage, precision),
        cpu,
        budget,
    )


def table(cfg: GPTConfig, micro_batch: int, precision: str, hw: Hardware) -> list[Estimate]:
    """Every ZeRO stage, with and without optimizer offload and activation checkpointing."""
    rows = []
    for zero in range(4):
        for offload in (False,) if zero == 0 else (False, True):
            for ckpt in (False, True):
                rows.append(estimate(cfg, micro_batch, precision, zero, hw, offload, ckpt))
    return rows


def training_days(
    cfg: GPTConfig, tokens: float, hw: Hardware, checkpointing: bool = False
) -> float:
    """Days to train on `tokens` at hw.mfu of the cluster's peak (recomputation costs a forward
    more)."""
    flops = cfg.flops_per_token() * tokens * (4 / 3 if checkpointing else 1.0)
    return flops / (hw.world * hw.peak_tflops * 1e12 * hw.mfu) / 86400


def report(
    cfg: GPTConfig, micro_batch: int, precision: str, hw: Hardware, tokens: float | None
) -> str:
    """The planner's table as text (what `gptflow capacity` prints)."""
    rows = table(cfg, micro_batch, precision, hw)
    lines = [
        f"model: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, context "
        f"{cfg.context_length}, vocab {cfg.vocab_size}: {rows[0].params / 1e6:,.1f}M parameters, "
        f"{cfg.flops_per_token() / 1e9:,.2f} GFLOP per training token",
        f"hardware: {hw.nodes} node(s) x {hw.gpus_per_node} GPUs of {hw.gpu_mem_gib:g} GiB "
        f"({hw.gpu_mem_gib - GPU_RESERVE_GIB:g} GiB usable each), micro-batch {micro_batch}, "
        f"{precision}",
        "",
        f"{'ZeRO':>4} {'offload':>7} {'ckpt':>4} | {'weights':>8} {'grads':>8} {'optim':>8} "
        f"{'buffers':>8} {'gathered':>8} {'activ.':>8} {'total':>8} GiB/GPU | {'CPU/node':>8} | "
        "fits",
    ]
    for r in rows:
        lines.append(
            f"{r.zero_stage:>4} {'yes' if r.offload_optimizer else 'no':>7} "
            f"{'yes' if r.activation_checkpointing else 'no':>4} | {r.weights / GIB:8.2f} "
            f"{r.gradients / GIB:8.2f} {r.optimizer / GIB:8.2f} {r.buffers / GIB:8.2f} "
            f"{r.gathered / GIB:8.2f} {r.activations / GIB:8.2f} {r.total / GIB:8.2f}         | "
            f"{r.cpu_offload_per_node / GIB:8.1f} | {'yes' if r.fits else 'NO'}"
        )
    fitting = [r for r in rows if r.fits]
    lines.append("")
    if fitting:
        best = min(
            fitting, key=lambda r: (r.offload_optimizer, r.activation_checkpointing, r.zero_stage)
        )
        lines.append(
            f"fastest setting that fits: ZeRO-{best.zero_stage}"
            f"{' with optimizer offload' if best.offload_optimizer else ''}"
            f"{' and activation checkpointing' if best.activation_checkpointing else ''}"
            f" ({best.total / GIB:.1f} of {best.budget / GIB:.0f} GiB)"
        )
        if tokens:
            days = training_days(cfg, tokens, hw, best.activation_checkpointing)
            lines.append(
                f"time for {tokens:.3g} tokens at {hw.mfu:.0%} MFU of {hw.peak_tflops:g} TFLOP/s "
                f"per GPU: {days * 24:,.1f} hours ({days:,.2f} days)"
            )
    else:
        lines.append("nothing fits: more GPUs, a smaller micro-batch or a smaller model")
    return "\n".join(lines)


def with_context(cfg: GPTConfig, context_length: int | None) -> GPTConfig:
    return dataclasses.replace(cfg, context_length=context_length) if context_length else cfg


def gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB" if math.isfinite(x) else str(x)


def teacher_bytes(teacher: GPTConfig, precision: str, micro_batch_size: int, context: int) -> float:
    """What a distillation teacher holds on each worker: its whole weights in the student's compute
    dtype (flows/train/teacher.py; never partitioned) and its final hidden states for one
    micro-batch (inference without gradients keeps no other activation)."""
    width = 2 if precision in HALF else 4
    return float(
        teacher.num_params() * width + micro_batch_size * context * teacher.d_model * width
    )


def preflight(
    tc, gpt: GPTConfig, stage: str, local: bool, teacher: GPTConfig | None = None
) -> Estimate | None:
    """The planner's verdict before a training run starts: ConfigError, with the figures, when the
    run cannot fit in the memory its workers have. GPU runs are checked against the first GPU this
    process sees; CPU runs on a local Ray instance against this machine's RAM shared by the workers.
    A distillation `teacher` takes its share of each worker's memory first (:func:`teacher_bytes`).
    Returns the estimate, or None when there is nothing to check against (a remote cluster's
    CPUs)."""
    from flows.config import ConfigError

    hw = Hardware(gpus_per_node=tc.num_workers, nodes=1)
    if tc.use_gpu:
        import torch

        if not torch.cuda.is_available():
            return None  # the driver of a GPU cluster often has no GPU; the workers will tell
        budget = torch.cuda.get_device_properties(0).total_memory - GPU_RESERVE_GIB * GIB
        where = f"each GPU has {torch.cuda.get_device_properties(0).total_memory / GIB:.1f} GiB"
    elif local:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        budget = total / tc.num_workers - CPU_WORKER_BASE_GIB * GIB
        where = f"this machine's {total / GIB:.1f} GiB of RAM shared by {tc.num_workers} worker(s)"
    else:
        return None
    held = (
        teacher_bytes(teacher, tc.precision, tc.micro_batch_size, gpt.context_length)
        if teacher
        else 0.0
    )
    budget -= held
    if held:
        where += (
            f", less the teacher's {gib(held)} on each worker "
            f"({teacher.num_params() / 1e6:,.1f}M parameters)"
        )
    e = estimate(
        gpt,
        tc.micro_batch_size,
        tc.precision,
        tc.zero_stage,
        hw,
        tc.offload_optimizer,
        gpt.activation_checkpointing,
        budget=budget,
        gpu=tc.use_gpu,
    )
    if not e.fits:
        raise ConfigError(
            f"{stage}: {e.params / 1e6:,.1f}M parameters will not fit: the capacity planner "
            f"estimates {gib(e.total)} per worker (weights {gib(e.weights)}, gradients "
            f"{gib(e.gradients)}, optimizer {gib(e.optimizer)}, buffers {gib(e.buffers)}, gathered "
            f"parameters {gib(e.gathered)}, activations {gib(e.activations)}) at "
            f"zero_stage={tc.zero_stage}, micro_batch_size={tc.micro_batch_size}, "
            f"precision={tc.precision}, but {where} ({gib(max(budget, 0))} usable each). Raise "
            "zero_stage, set offload_optimizer or model.activation_checkpointing, lower "
            "micro_batch_size, or add memory; `gptflow capacity` prints every option"
        )
    return e
