"""The training loop that runs inside each Ray Train worker: one loop for pretraining, fine-tuning
and distillation.

What it is: ``train_loop_per_worker(config)``, handed to ``TorchTrainer`` by flows/train/driver.py.
It builds (or loads) the gptcore model, wraps it with ``deepspeed.initialize`` using the DeepSpeed
config the driver generated, resumes from ``ray.train.get_checkpoint()`` if there is one, and then
runs a short explicit loop: step, and on intervals evaluate / checkpoint. At the end rank 0 writes
the bundle (flows/train/bundle.py). Distillation is this loop with a frozen teacher beside the
student (flows/train/teacher.py), whose hidden states turn the loss into the distillation loss;
everything else (ZeRO, resume, skips) is shared. A lost worker makes Ray restart the group, which
resumes from the latest checkpoint; a stop the loop makes itself (repeated bad updates) is recorded
first, so the restarted group returns instead of training into it again
(flows.train.checkpoint.TrainingStopped).

What it is not: the driver (validation, config generation, MLflow run, output paths:
flows/train/driver.py), nor the data reader (flows/train/windows.py). Every rank must call
``ray.train.report`` equally often, so reports happen only with checkpoints; per-step metrics go
straight to MLflow from rank 0.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flows.config import TrainConfig
from flows.progress import Sender
from flows.train import faults
from flows.train.bundle import export_bundle
from flows.train.checkpoint import (
    LoopState,
    TrainingStopped,
    load_checkpoint,
    read_stop,
    record_stop,
    save_checkpoint,
)
from flows.train.engine import UpdateGate, init_engine
from flows.train.prepare import LoopConfig, RunSpec
from flows.train.teacher import Teacher, loss_parts
from flows.train.telemetry import (
    AsyncLogger,
    Throughput,
    current_rss_bytes,
    default_peak_flops,
    gradient_norm,
    loss_figure,
    memory_figures,
)
from flows.train.windows import TokenWindows
from gptcore import Distillation

log = logging.getLogger(__name__)


def compute_loss(
    model: Any,
    batch: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    device: torch.device,
    distill: Distillation | None = None,
) -> torch.Tensor:
    """Mean next-token loss of a batch; with a loss mask (fine-tuning) only masked targets count.

    With `distill` (the teacher's targets for this batch) it is the distillation loss instead.
    """
    x, y, m = batch
    mask = torch.from_numpy(m).to(device) if m is not None else None
    # return_logits=False: the fused chunked LM head + loss, no (B, T, vocab) logits in memory
    _, loss = model(
        torch.from_numpy(x).to(device),
        targets=torch.from_numpy(y).to(device),
        loss_mask=mask,
        return_logits=False,
        distill=distill,
    )
    return loss


def is_bad_loss(loss: float, running_mean: float | None, spike_factor: float) -> bool:
    """A loss that must not update the weights: NaN/inf, or (if enabled) a spike over the running
    mean."""
    if not math.isfinite(loss):
        return True
    return spike_factor > 0 and running_mean is not None and loss > spike_factor * running_mean


def _build_model(spec: RunSpec):
    """The initial model on this rank: a fresh GPT (same seed on every rank) or the init bundle's
    weights.

    Either way the model is built from the driver's config, so a fine-tuning run's own dropout and
    activation checkpointing apply to the loaded weights.
    """
    from gptcore import GPT, GPTConfig, Tokenizer, load_bundle

    lora = spec.train.lora
    torch.manual_seed(spec.train.seed)
    model = GPT(GPTConfig.from_dict(spec.gpt_config))
    if spec.init_bundle:
        loaded, tokenizer, _ = load_bundle(spec.init_bundle)
        model.load_state_dict(loaded.state_dict())
        del loaded
    else:
        tokenizer = Tokenizer.load(Path(spec.dataset.path) / "tokenizer.json")
    if lora.r:  # adapters beside frozen weights (same seed on every rank: the same A everywhere)
        from gptcore.lora import apply_lora

        apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.targets)
    return model, tokenizer


@torch.no_grad()
def _evaluate(
    engine: Any, val: TokenWindows | None, tc: TrainConfig, device: torch.device
) -> float | None:
    """Mean validation loss over every rank's fixed validation windows (a collective)."""
    if val is None:
        return None
    engine.eval()
    total = torch.zeros(
        2, dtype=torch.float64, device=device
    )  # on the device: nccl reduces no CPU tensors
    windows = torch.tensor([len(val)], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(windows, op=dist.ReduceOp.MIN)
    for batch in val.eval_batches(tc.eval_batches, tc.micro_batch_size, limit=int(windows)):
        loss = compute_loss(engine, batch, device)
        total += torch.tensor(
            [float(loss) * len(batch[0]), len(batch[0])], dtype=torch.float64, device=device
        )
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


@torch.no_grad()
def _samples(engine: Any, tokenizer: Any, tc: TrainConfig) -> str:
    """Greedy continuations of the sample prompts. Every rank runs it: under ZeRO-3 each forward
    gathers parameters collectively, and greedy decoding makes every rank take the same path."""
    from gptcore import generate

    engine.module.eval()
    lines = []
    for prompt in tc.sample_prompts:
        ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
        out = generate(
            engine.module, ids, max_new_tokens=tc.sample_tokens, stop_ids=tokenizer.stop_ids
        )
        lines.append(f"--- {prompt!r}\n{prompt}{tokenizer.decode(out)}\n")
    engine.module.train()
    return "\n".join(lines)


def _stop(spec: RunSpec, message: str) -> TrainingStopped:
    """A stop every rank reaches together, recorded so that a restarted worker group does not train
    into it again (see flows.train.checkpoint.TrainingStopped); raise what this returns."""
    record_stop(spec.storage_path, spec.run_name, message)
    return TrainingStopped(message)


def _device(tc: TrainConfig) -> torch.device:
    """This worker's GPU (Ray Train assigns it), or the CPU with the worker's share of threads."""
    if not tc.use_gpu:
        torch.set_num_threads(tc.cpus_per_worker)
        return torch.device("cpu")
    from ray.train.torch import get_device

    device = get_device()
    torch.cuda.set_device(device)
    return device


def _resume(engine: Any, spec: RunSpec, rank: int) -> LoopState:
    """The loop state of Ray's latest checkpoint, loaded into the engine; a fresh state without
    one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        torch.manual_seed(spec.train.seed * 1000 + rank)  # dropout differs per rank, reproducibly
        return LoopState()
    state = load_checkpoint(engine, checkpoint, rank)
    log.info("rank %d resumed at step %d", rank, state.step)
    if state.step > spec.train.steps:
        raise _stop(
            spec,
            (
                f"run {spec.run_name!r} under {spec.storage_path} has a checkpoint at step "
                f"{state.step}, past steps={spec.train.steps}: a run resumes into the same or more "
                "steps, never fewer; use another run_name"
            ),
        )
    return state


def _tracking(cfg: LoopConfig, rank: int, world: int) -> AsyncLogger | None:
    """Tags where this rank runs (on a cluster the workers span its nodes) in the stage's MLflow
    run; rank 0's logger for that run (None on the other ranks, or with tracking off)."""
    import ray

    from flows.tracking import attach

    node = ray.get_runtime_context().get_node_id()
    log.info("rank %d of %d on node %s", rank, world, node)
    attach(cfg.run_id, cfg.tracking_uri).set_tags({f"gptflow.worker.rank{rank}.node_id": node})
    tracker = attach(cfg.run_id, cfg.tracking_uri) if rank == 0 else attach(None, None)
    return AsyncLogger(tracker) if tracker.enabled else None


@dataclass
class _Step:
    """One optimizer step's outcome, the same on every rank (all-reduced)."""

    loss: float
    """Mean loss over the micro-batches and ranks; NaN or spiking when the update was skipped."""
    bad: bool
    """The update was skipped: a bad loss on some rank, or DeepSpeed's own skip."""
    ce_loss: float
    kd_kl: float
    """Distillation: the loss's cross-entropy and KL parts (0 otherwise)."""
    grad_norm: float | None
    """Measured by rank 0 itself (plain fp32 without ZeRO), else None: DeepSpeed's is read."""


def _train_step(
    engine: Any,
    gate: UpdateGate,
    data: TokenWindows,
    teacher: Teacher | None,
    tc: TrainConfig,
    state: LoopState,
    device: torch.device,
    rank: int,
    world: int,
    injected: faults.Faults,
    own_grad_norm: bool,
) -> _Step:
    """The micro-batches of step ``state.step``, backward each, and one update that every rank skips
    together when any rank's loss was bad."""
    step, ga = state.step, tc.grad_accum
    loss_sum, bad, grad_norm = 0.0, False, None
    kd_sums = [0.0, 0.0]  # distillation: the cross-entropy and KL parts of the loss
    ds_skipped = engine.skipped_steps
    for micro in range(ga):
        batch = data.train_batch(tc.seed, step, micro, ga, tc.micro_batch_size)
        kd = teacher.targets(batch[0]) if teacher else None
        loss = compute_loss(engine, batch, device, kd)
        if kd is not None:
            kd_sums = [a + b for a, b in zip(kd_sums, loss_parts(kd, batch), strict=True)]
        loss = faults.poison(injected, loss, step, micro, rank)
        value = float(loss.detach())
        loss_sum += value  # a bad step logs its real (NaN or spiking) loss
        if is_bad_loss(value, state.loss_ema, tc.loss_spike_factor):
            # Backward a zero loss instead, so every rank runs the same DeepSpeed hooks and ZeRO
            # collectives. Its gradients are zero when only the loss is non-finite; NaN activations
            # can still make NaN gradients (0 * inf), harmless because the update is skipped.
            bad = True
            loss = loss * 0.0
        engine.backward(loss)
        if micro == ga - 1:
            flags = torch.tensor(
                [loss_sum / ga, float(bad), kd_sums[0] / ga, kd_sums[1] / ga],
                dtype=torch.float64,
                device=device,
            )
            if world > 1:
                dist.all_reduce(
                    flags
                )  # one decision for all ranks: any rank's bad loss skips the step
            bad = flags[1].item() > 0
            gate.skip = bad  # no optimizer update: weights and Adam state stay as they were
            if own_grad_norm:
                grad_norm = gradient_norm(engine.module)
        engine.step()
    gate.skip = False
    if (
        engine.skipped_steps > ds_skipped
        and tc.precision != "fp16"
        and engine.lr_scheduler is not None
    ):
        # DeepSpeed skipped the update itself (a non-finite gradient norm under ZeRO or bf16) and,
        # unlike a gated skip, left the lr schedule where it was. Advance it: the schedule's clock
        # is the step count, which is also the data position and what a checkpoint resumes from.
        # (fp16 is left alone: its loss-scale search skips steps on purpose, DeepSpeed's way.)
        engine.lr_scheduler.step()
        bad = True
    if torch.cuda.is_available() and tc.use_gpu:
        torch.cuda.synchronize()
    return _Step(
        float(flags[0]) / world, bad, float(flags[2]) / world, float(flags[3]) / world, grad_norm
    )


def _count_skip(spec: RunSpec, state: LoopState, result: _Step) -> None:
    """Counts a skipped update (and stops after too many in a row), or follows the loss's running
    mean."""
    tc = spec.train
    if not result.bad:
        state.skipped_in_a_row = 0
        state.loss_ema = (
            result.loss if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * result.loss
        )
        return
    state.skipped_total += 1
    state.skipped_in_a_row += 1
    log.warning(
        "step %d: loss %.4g is NaN/inf or a spike; update skipped (%d in a row)",
        state.step,
        result.loss,
        state.skipped_in_a_row,
    )
    if state.skipped_in_a_row >= tc.max_skipped_updates:
        raise _stop(
            spec,
            (
                f"training stopped at step {state.step}: {state.skipped_in_a_row} consecutive "
                f"updates had a NaN/inf loss or a loss spike over {tc.loss_spike_factor}x the "
                "running mean; the last good resume checkpoint is kept under "
                f"{spec.storage_path}/{spec.run_name}"
            ),
        )


def _evaluate_and_sample(
    engine: Any,
    val: TokenWindows | None,
    tokenizer: Any,
    tc: TrainConfig,
    device: torch.device,
    logger: AsyncLogger | None,
    step: int,
) -> float | None:
    """Validation loss (None without a validation split) and the sample generations, logged at
    `step`."""
    val_loss = _evaluate(engine, val, tc, device)
    text = _samples(engine, tokenizer, tc)
    if logger:
        if val_loss is not None:
            logger.metrics(
                {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}, step
            )
        logger.text(text, f"samples/step_{step:08d}.txt")
    return val_loss


def _log_step(
    logger: AsyncLogger,
    engine: Any,
    result: _Step,
    speed: Throughput,
    dt: float,
    state: LoopState,
    distilling: bool,
) -> None:
    grad_norm = result.grad_norm if result.grad_norm is not None else engine.get_global_grad_norm()
    metrics = {
        "loss": result.loss,
        "lr": engine.get_lr()[0],
        "tokens_per_s": speed.tokens_per_step / dt,
        "skipped_updates": state.skipped_total,
    }
    if grad_norm is not None and not result.bad:
        metrics["grad_norm"] = float(grad_norm)
    if distilling:  # the loss's two parts, averaged over ranks like the loss
        metrics |= {"ce_loss": result.ce_loss, "kd_kl": result.kd_kl}
    if speed.peak > 0:
        metrics["mfu"] = speed.flops_per_token * speed.tokens_per_step / dt / speed.peak
    logger.metrics(metrics, state.step)


def _teacher(spec: RunSpec, device: torch.device) -> Teacher | None:
    """Distillation's frozen teacher beside the student, or None for a run without one."""
    if not spec.teacher:
        return None
    t = spec.teacher
    return Teacher(t["bundle"], spec.train.precision, t["alpha"], t["temperature"], device)


def _windows(spec: RunSpec, rank: int, world: int) -> tuple[TokenWindows, TokenWindows | None]:
    """This rank's training windows and its validation windows (None without an eval split)."""
    path, T = spec.dataset.path, spec.context_length
    val = TokenWindows(path, spec.eval_split, T, rank, world) if spec.eval_split else None
    return TokenWindows(path, spec.split, T, rank, world), val


def _throughput(cfg: LoopConfig, world: int, first_step: int) -> Throughput:
    """Tokens/s and MFU over all ranks, counted from the step the run starts (or resumes) at."""
    tc = cfg.spec.train
    peak = tc.peak_flops_per_device or default_peak_flops(
        tc.precision, tc.use_gpu, tc.cpus_per_worker
    )
    tokens_per_step = tc.micro_batch_size * tc.grad_accum * cfg.spec.context_length * world
    return Throughput(tokens_per_step, cfg.flops_per_token, peak * world, first_step=first_step)


def _report(state: LoopState, result: _Step, val_loss: float | None) -> dict[str, Any]:
    """What a checkpoint reports to Ray Train (the driver reads the last one)."""
    report = {"step": state.step, "loss": result.loss, "skipped_updates": state.skipped_total}
    if val_loss is not None:
        report["val_loss"] = val_loss
    return report


def train_loop_per_worker(cfg: LoopConfig) -> None:
    """One worker's run: build, resume, then step; evaluate, log and checkpoint on intervals;
    export."""
    import ray.train

    spec, tc = cfg.spec, cfg.spec.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    stopped = read_stop(spec.storage_path, spec.run_name)
    if stopped is not None:
        # Ray restarted the group after this run stopped itself: resuming would stop there again.
        # Every rank returns without a collective; the driver raises the recorded message.
        log.warning("rank %d: not resuming a run that stopped: %s", rank, stopped)
        return
    device = _device(tc)
    logging.basicConfig(level=logging.INFO)
    injected = faults.from_env()  # test-only (flows/train/faults.py); none in normal use

    # what the planner's estimate is compared with grows from here
    rss_before_model = current_rss_bytes()
    model, tokenizer = _build_model(spec)
    engine, gate = init_engine(tc, spec.deepspeed_config, model)
    teacher = _teacher(spec, device)
    if tc.compile:
        # lazily: the first forward pays the compile; checkpoints and export use engine.module
        engine.compile()
    data, val = _windows(spec, rank, world)
    state = _resume(engine, spec, rank)
    logger = _tracking(cfg, rank, world)
    progress = Sender(cfg.progress if rank == 0 else None)  # the driver's terminal line
    speed = _throughput(cfg, world, state.step)
    first_step = state.step
    # DeepSpeed keeps the gradient norm of every path but plain fp32 without ZeRO (it clips and
    # drops it there); rank 0 then measures it itself from the already all-reduced gradients.
    own_grad_norm = (
        logger is not None and tc.zero_stage == 0 and tc.precision in ("fp32", "bf16-autocast")
    )

    while state.step < tc.steps:
        faults.exit_once(injected, state.step, rank, world, spec.storage_path, spec.run_name)
        t0 = time.perf_counter()
        result = _train_step(
            engine, gate, data, teacher, tc, state, device, rank, world, injected, own_grad_norm
        )
        dt = time.perf_counter() - t0
        state.step += 1
        state.tokens_seen += speed.tokens_per_step
        speed.add(state.step, dt)
        _count_skip(spec, state, result)

        val_loss = None
        is_last = state.step == tc.steps
        if state.step % tc.eval_every == 0 or is_last:
            val_loss = _evaluate_and_sample(engine, val, tokenizer, tc, device, logger, state.step)
        state.history.append(
            [state.step, result.loss, val_loss if val_loss is not None else float("nan")]
        )
        if logger:
            _log_step(logger, engine, result, speed, dt, state, teacher is not None)
        progress.step(
            state.step, tc.steps, loss=result.loss, tokens_per_s=speed.tokens_per_step / dt
        )

        if state.step % tc.checkpoint_every == 0 or is_last:
            report = _report(state, result, val_loss)
            if is_last:
                report.update(speed.figures(state.tokens_seen))
                report.update(memory_figures(rss_before_model, tc.use_gpu, device, world))
            save_checkpoint(engine, state, report, rank)

    _finish(engine, tokenizer, cfg, state, rank, first_step, logger)


def _finish(
    engine: Any,
    tokenizer: Any,
    cfg: LoopConfig,
    state: LoopState,
    rank: int,
    first_step: int,
    logger: AsyncLogger | None,
) -> None:
    """The loss curve, and the bundle with the run's figures in its metadata (every rank joins)."""
    spec = cfg.spec
    if logger and state.history:
        logger.figure(
            loss_figure(state.history, f"{spec.stage} ({spec.run_name})"), "loss_curve.png"
        )
    export_bundle(
        engine,
        tokenizer,
        spec,
        rank,
        cfg.bundle_metadata
        | {
            "steps": state.step,
            "skipped_updates": state.skipped_total,
            "final_loss": state.history[-1][1] if state.history else None,
            # The checkpoint step the last worker start resumed from (0: from scratch): a restart
            # after a failure, or an earlier, shorter run of the same run_name (resumed into more
            # steps).
            "resumed_from_step": first_step,
        },
    )
    if logger:
        logger.close()
