"""The training loop that runs inside each Ray Train worker: one loop for pretraining, fine-tuning and distillation.

What it is: ``train_loop_per_worker(config)``, handed to ``TorchTrainer`` by flows/train/driver.py. It builds
(or loads) the gptcore model, wraps it with ``deepspeed.initialize`` using the DeepSpeed config the
driver generated, resumes from ``ray.train.get_checkpoint()`` if there is one, and then runs a short
explicit loop: step, and on intervals evaluate / checkpoint. At the end rank 0 writes the bundle.
Distillation is this loop with a frozen teacher beside the student (flows/train/teacher.py), whose
hidden states turn the loss into the distillation loss; everything else (ZeRO, resume, skips) is shared.
A lost worker makes Ray restart the group, which resumes from the latest checkpoint; a stop the loop
makes itself (repeated bad updates) is recorded first, so the restarted group returns instead of
training into it again (flows.train.checkpoint.TrainingStopped).

What it is not: the driver (validation, config generation, MLflow run, output paths: flows/train/driver.py),
nor the data reader (flows/train/windows.py). Every rank must call ``ray.train.report`` equally often,
so reports happen only with checkpoints; per-step metrics go straight to MLflow from rank 0.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flows.progress import Sender
from flows.train.checkpoint import (
    LoopState,
    TrainingStopped,
    load_checkpoint,
    read_stop,
    record_stop,
    save_checkpoint,
)
from flows.train.prepare import LoopConfig
from flows.train.teacher import Teacher, loss_parts
from flows.train.telemetry import (
    AsyncLogger,
    current_rss_bytes,
    default_peak_flops,
    gradient_norm,
    loss_figure,
    peak_rss_bytes,
)
from flows.train.windows import TokenWindows
from gptcore import Distillation

log = logging.getLogger(__name__)


def compute_loss(model: Any, batch: tuple[np.ndarray, np.ndarray, np.ndarray | None], device: torch.device,
                 distill: Distillation | None = None) -> torch.Tensor:
    """Mean next-token loss of a batch; with a loss mask (fine-tuning) only masked targets count.

    With `distill` (the teacher's targets for this batch) it is the distillation loss instead.
    """
    x, y, m = batch
    mask = torch.from_numpy(m).to(device) if m is not None else None
    # return_logits=False: the fused chunked LM head + loss, no (B, T, vocab) logits in memory
    _, loss = model(torch.from_numpy(x).to(device), targets=torch.from_numpy(y).to(device), loss_mask=mask,
                    return_logits=False, distill=distill)
    return loss


def is_bad_loss(loss: float, running_mean: float | None, spike_factor: float) -> bool:
    """A loss that must not update the weights: NaN/inf, or (if enabled) a spike over the running mean."""
    if not math.isfinite(loss):
        return True
    return spike_factor > 0 and running_mean is not None and loss > spike_factor * running_mean


def _build_model(cfg: LoopConfig):
    """The initial model on this rank: a fresh GPT (same seed on every rank) or the init bundle's weights.

    Either way the model is built from the driver's config, so a fine-tuning run's own dropout and
    activation checkpointing apply to the loaded weights.
    """
    from gptcore import GPT, GPTConfig, Tokenizer, load_bundle

    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig.from_dict(cfg.gpt_config))
    if cfg.init_bundle:
        loaded, tokenizer, _ = load_bundle(cfg.init_bundle)
        model.load_state_dict(loaded.state_dict())
        del loaded
    else:
        tokenizer = Tokenizer.load(Path(cfg.dataset) / "tokenizer.json")
    if cfg.lora:  # adapters beside frozen weights (same seed on every rank: the same A everywhere)
        from gptcore.lora import apply_lora

        apply_lora(model, cfg.lora["r"], cfg.lora["alpha"], cfg.lora["dropout"], cfg.lora["targets"])
    return model, tokenizer


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (linear layers, embeddings), none on biases and LayerNorms."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _UpdateGate:
    """Makes the innermost optimizer's ``step()`` a no-op while ``skip`` is set.

    Why here and not around ``engine.step()``: the engine step also ends the gradient-accumulation
    boundary (ZeRO bucket and gradient resets, ``zero_grad``, step counters, the lr schedule), which
    must happen on every rank at every step. Only the base optimizer's update is skipped, so the
    weights *and* the Adam state (moments, step count) stay exactly as they were. Under ZeRO the
    wrapper still copies its fp32 partition back into the model parameters afterwards; the partition
    did not change, so neither do the weights.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.skip = False
        self._step = optimizer.step
        optimizer.step = self._gated  # an instance attribute wins over the class's (hooked) step

    def _gated(self, *args: Any, **kwargs: Any) -> Any:
        return None if self.skip else self._step(*args, **kwargs)


def _init_engine(cfg: LoopConfig, model: torch.nn.Module):
    """The DeepSpeed engine and the gate that can skip one update of its base optimizer."""
    import deepspeed

    ds_config = cfg.deepspeed_config
    groups = _param_groups(model, cfg.weight_decay)
    optimizer = None
    if "optimizer" not in ds_config:
        # torch's AdamW as the client optimizer: no JIT-compiled DeepSpeed op on CPU (see STACK-NOTES),
        # fused kernels on GPU. DeepSpeed wraps it for ZeRO and drives the schedule from its config.
        kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": 1e-8}
        if cfg.use_gpu:
            kwargs["fused"] = True
        optimizer = torch.optim.AdamW(groups, **kwargs)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
        config=ds_config, dist_init_required=False,
    )
    # basic_optimizer: the client AdamW, or DeepSpeed's own (CPU Adam) with offload; ZeRO and bf16
    # wrappers call its step() by attribute lookup, so the gate sees every update.
    return engine, _UpdateGate(engine.basic_optimizer)


@torch.no_grad()
def _evaluate(engine: Any, val: TokenWindows | None, cfg: LoopConfig, device: torch.device) -> float | None:
    """Mean validation loss over every rank's fixed validation windows (a collective)."""
    if val is None:
        return None
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # on the device: nccl reduces no CPU tensors
    windows = torch.tensor([len(val)], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(windows, op=dist.ReduceOp.MIN)
    for batch in val.eval_batches(cfg.eval_batches, cfg.micro_batch_size, limit=int(windows)):
        loss = compute_loss(engine, batch, device)
        total += torch.tensor([float(loss) * len(batch[0]), len(batch[0])], dtype=torch.float64, device=device)
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


@torch.no_grad()
def _samples(engine: Any, tokenizer: Any, cfg: LoopConfig) -> str:
    """Greedy continuations of the sample prompts. Every rank runs it: under ZeRO-3 each forward
    gathers parameters collectively, and greedy decoding makes every rank take the same path."""
    from gptcore import generate

    engine.module.eval()
    lines = []
    for prompt in cfg.sample_prompts:
        ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
        out = generate(engine.module, ids, max_new_tokens=cfg.sample_tokens, stop_ids=tokenizer.stop_ids)
        lines.append(f"--- {prompt!r}\n{prompt}{tokenizer.decode(out)}\n")
    engine.module.train()
    return "\n".join(lines)


def _export_bundle(engine: Any, tokenizer: Any, cfg: LoopConfig, rank: int, metadata: dict[str, Any]) -> None:
    """Rank 0 writes the bundle; under ZeRO-3 all ranks must join the parameter gather first."""
    from deepspeed.utils import safe_get_full_fp32_param

    from gptcore import GPT, GPTConfig, save_bundle

    if cfg.lora:
        _export_merged(engine, tokenizer, cfg, rank, metadata)
        return
    state = None
    if cfg.precision in ("bf16", "fp16"):
        # The fp32 master weights, not their bf16/fp16 rounding. Each call is a collective under
        # ZeRO (a gather or all-reduce of that parameter's shards), so every rank makes them all.
        full = {name: safe_get_full_fp32_param(p) for name, p in engine.module.named_parameters()}
        if all(v is not None for v in full.values()):
            state = full
    if state is None and cfg.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
    elif state is None:
        state = engine.module.state_dict()
    if rank != 0:
        return
    model = GPT(GPTConfig.from_dict(engine.module.config.to_dict()))
    sd = {k: v.detach().float().cpu() for k, v in state.items()}
    sd.setdefault("lm_head.weight", sd["wte.weight"])  # tied; a gather may list it only once
    model.load_state_dict(sd)
    save_bundle(cfg.output_dir, model, tokenizer, metadata)


def _export_merged(engine: Any, tokenizer: Any, cfg: LoopConfig, rank: int, metadata: dict[str, Any]) -> None:
    """LoRA: the adapters (their fp32 master copies under bf16/fp16) merged into the init bundle's own
    fp32 weights, which stayed frozen -- not their bf16 rounding in the engine. A plain bundle of the
    base's size. Every rank joins the gathers (collectives under ZeRO); rank 0 writes."""
    from deepspeed.utils import safe_get_full_fp32_param

    from gptcore import GPT, GPTConfig, load_bundle, save_bundle
    from gptcore.lora import merge_state_dict

    adapters = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p) if cfg.precision in ("bf16", "fp16") else None
            adapters[name] = (full if full is not None else p).detach().float().cpu()
    if rank != 0:
        return
    base, _, _ = load_bundle(cfg.init_bundle)
    state = merge_state_dict({**base.state_dict(), **adapters}, cfg.lora["r"], cfg.lora["alpha"])
    model = GPT(GPTConfig.from_dict(engine.module.config.to_dict()))  # the run's dropout, as for full training
    model.load_state_dict(state)
    save_bundle(cfg.output_dir, model, tokenizer, metadata | {"lora": cfg.lora})


def _stop(cfg: LoopConfig, message: str) -> TrainingStopped:
    """A stop every rank reaches together, recorded so that a restarted worker group does not train
    into it again (see flows.train.checkpoint.TrainingStopped); raise what this returns."""
    record_stop(cfg.storage_path, cfg.run_name, message)
    return TrainingStopped(message)


def train_loop_per_worker(cfg: LoopConfig) -> None:
    import ray.train

    from flows.tracking import attach

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    stopped = read_stop(cfg.storage_path, cfg.run_name)
    if stopped is not None:
        # Ray restarted the group after this run stopped itself: resuming would stop there again.
        # Every rank returns without a collective; the driver raises the recorded message.
        log.warning("rank %d: not resuming a run that stopped: %s", rank, stopped)
        return
    if cfg.use_gpu:
        from ray.train.torch import get_device

        device = get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cfg.cpus_per_worker)
    logging.basicConfig(level=logging.INFO)

    rss_before_model = current_rss_bytes()  # what the planner's estimate is compared with grows from here
    model, tokenizer = _build_model(cfg)
    engine, gate = _init_engine(cfg, model)
    teacher = (Teacher(cfg.teacher_bundle, cfg.precision, cfg.distill_alpha, cfg.distill_temperature, device)
               if cfg.teacher_bundle else None)
    if cfg.compile:
        engine.compile()  # lazily: the first forward pays the compile; checkpoints and export use engine.module
    T = cfg.context_length
    data = TokenWindows(cfg.dataset, cfg.split, T, rank, world)
    val = TokenWindows(cfg.dataset, cfg.eval_split, T, rank, world) if cfg.eval_split else None

    state = LoopState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_checkpoint(engine, checkpoint, rank)
        log.info("rank %d resumed at step %d", rank, state.step)
        if state.step > cfg.steps:
            raise _stop(cfg, (
                f"run {cfg.run_name!r} under {cfg.storage_path} has a checkpoint at step {state.step}, past "
                f"steps={cfg.steps}: a run resumes into the same or more steps, never fewer; use another run_name"
            ))
    else:
        torch.manual_seed(cfg.seed * 1000 + rank)  # dropout differs per rank, reproducibly

    # Where each rank runs, in the stage's MLflow run: on a cluster the workers span its nodes.
    node = ray.get_runtime_context().get_node_id()
    log.info("rank %d of %d on node %s", rank, world, node)
    attach(cfg.run_id, cfg.tracking_uri).set_tags({f"gptflow.worker.rank{rank}.node_id": node})
    tracker = attach(cfg.run_id, cfg.tracking_uri) if rank == 0 else attach(None, None)
    logger = AsyncLogger(tracker) if tracker.enabled else None

    progress = Sender(cfg.progress if rank == 0 else None)  # the driver's terminal line
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * T * world
    flops_per_step = cfg.flops_per_token * tokens_per_step
    peak = (cfg.peak_flops_per_device
            or default_peak_flops(cfg.precision, cfg.use_gpu, cfg.cpus_per_worker)) * world
    steps, ga, mbs = cfg.steps, cfg.grad_accum, cfg.micro_batch_size
    timed_steps, timed_seconds = 0, 0.0
    first_step = state.step
    val_loss: float | None = None
    # DeepSpeed keeps the gradient norm of every path but plain fp32 without ZeRO (it clips and
    # drops it there); rank 0 then measures it itself from the already all-reduced gradients.
    own_grad_norm = logger is not None and cfg.zero_stage == 0 and cfg.precision in ("fp32", "bf16-autocast")
    grad_norm: float | None = None

    while state.step < steps:
        step = state.step
        if step == cfg.fail_at_step and rank == min(1, world - 1) and cfg.fail_marker:
            marker = Path(cfg.fail_marker)
            if not marker.exists():  # once per run: the restarted worker passes this step
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"rank {rank} exited at step {step}\n")
                log.warning("injected failure: rank %d exits at step %d", rank, step)
                os._exit(1)

        t0 = time.perf_counter()
        loss_sum, bad = 0.0, False
        kd_sums = [0.0, 0.0]  # distillation: the cross-entropy and KL parts of the loss
        ds_skipped = engine.skipped_steps
        for micro in range(ga):
            batch = data.train_batch(cfg.seed, step, micro, ga, mbs)
            kd = teacher.targets(batch[0]) if teacher else None
            loss = compute_loss(engine, batch, device, kd)
            if kd is not None:
                kd_sums = [a + b for a, b in zip(kd_sums, loss_parts(kd, batch), strict=True)]
            if step == cfg.nan_at_step and micro == 0 and rank == 0:
                # Testing only (a loop-config key, no TrainConfig field): a NaN loss on one rank with
                # the graph intact; the other ranks learn of it only through the all-reduced flag.
                loss = loss + float("nan")
            value = float(loss.detach())
            loss_sum += value  # a bad step logs its real (NaN or spiking) loss
            if is_bad_loss(value, state.loss_ema, cfg.loss_spike_factor):
                # Backward a zero loss instead, so every rank runs the same DeepSpeed hooks and ZeRO
                # collectives. Its gradients are zero when only the loss is non-finite; NaN activations
                # can still make NaN gradients (0 * inf), harmless because the update is skipped.
                bad = True
                loss = loss * 0.0
            engine.backward(loss)
            if micro == ga - 1:
                flags = torch.tensor([loss_sum / ga, float(bad), kd_sums[0] / ga, kd_sums[1] / ga],
                                     dtype=torch.float64, device=device)
                if world > 1:
                    dist.all_reduce(flags)  # one decision for all ranks: any rank's bad loss skips the step
                bad = flags[1].item() > 0
                gate.skip = bad  # no optimizer update: weights and Adam state stay as they were
                if own_grad_norm:
                    grad_norm = gradient_norm(engine.module)
            engine.step()
        gate.skip = False
        if engine.skipped_steps > ds_skipped and cfg.precision != "fp16" and engine.lr_scheduler is not None:
            # DeepSpeed skipped the update itself (a non-finite gradient norm under ZeRO or bf16) and,
            # unlike a gated skip, left the lr schedule where it was. Advance it: the schedule's clock
            # is the step count, which is also the data position and what a checkpoint resumes from.
            # (fp16 is left alone: its loss-scale search skips steps on purpose, DeepSpeed's way.)
            engine.lr_scheduler.step()
            bad = True
        step_loss = float(flags[0]) / world
        if torch.cuda.is_available() and cfg.use_gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        state.step += 1
        state.tokens_seen += tokens_per_step
        if state.step - first_step > cfg.warmup_timing_steps:
            timed_steps += 1
            timed_seconds += dt

        if bad:
            state.skipped_total += 1
            state.skipped_in_a_row += 1
            log.warning("step %d: loss %.4g is NaN/inf or a spike; update skipped (%d in a row)",
                        state.step, step_loss, state.skipped_in_a_row)
            if state.skipped_in_a_row >= cfg.max_skipped_updates:
                raise _stop(cfg, (
                    f"training stopped at step {state.step}: {state.skipped_in_a_row} consecutive updates had a "
                    f"NaN/inf loss or a loss spike over {cfg.loss_spike_factor}x the running mean; the last good "
                    f"resume checkpoint is kept under {cfg.storage_path}/{cfg.run_name}"
                ))
        else:
            state.skipped_in_a_row = 0
            state.loss_ema = step_loss if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * step_loss

        val_loss = None
        is_last = state.step == steps
        if state.step % cfg.eval_every == 0 or is_last:
            val_loss = _evaluate(engine, val, cfg, device)
            text = _samples(engine, tokenizer, cfg)
            if logger:
                if val_loss is not None:
                    logger.metrics({"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}, state.step)
                logger.text(text, f"samples/step_{state.step:08d}.txt")
        state.history.append([state.step, step_loss, val_loss if val_loss is not None else float("nan")])

        if logger:
            if not own_grad_norm:
                grad_norm = engine.get_global_grad_norm()
            metrics = {
                "loss": step_loss, "lr": engine.get_lr()[0], "tokens_per_s": tokens_per_step / dt,
                "skipped_updates": state.skipped_total,
            }
            if grad_norm is not None and not bad:
                metrics["grad_norm"] = float(grad_norm)
            if teacher is not None:  # the loss's two parts, averaged over ranks like the loss
                metrics |= {"ce_loss": float(flags[2]) / world, "kd_kl": float(flags[3]) / world}
            if peak > 0:
                metrics["mfu"] = flops_per_step / dt / peak
            logger.metrics(metrics, state.step)

        progress.step(state.step, steps, loss=step_loss, tokens_per_s=tokens_per_step / dt)

        if state.step % cfg.checkpoint_every == 0 or is_last:
            report = {"step": state.step, "loss": step_loss, "skipped_updates": state.skipped_total}
            if val_loss is not None:
                report["val_loss"] = val_loss
            if is_last:
                tps = tokens_per_step * timed_steps / timed_seconds if timed_seconds > 0 else float("nan")
                mem = torch.tensor([float(peak_rss_bytes()), float(peak_rss_bytes() - rss_before_model)],
                                   dtype=torch.float64, device=device)
                if world > 1:
                    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
                report.update({
                    "tokens_per_s": tps, "mfu": tps * cfg.flops_per_token / peak if peak > 0 else float("nan"),
                    "timed_steps": timed_steps, "peak_rss_bytes_max_rank": float(mem[0]),
                    "rss_growth_bytes_max_rank": float(mem[1]),  # peak minus before the model was built
                    "tokens_seen": state.tokens_seen,
                })
                if cfg.use_gpu:
                    report["peak_gpu_bytes_rank0"] = float(torch.cuda.max_memory_allocated(device))
            save_checkpoint(engine, state, report, rank)

    if logger and state.history:
        logger.figure(loss_figure(state.history, f"{cfg.stage} ({cfg.run_name})"), "loss_curve.png")
    _export_bundle(engine, tokenizer, cfg, rank, cfg.bundle_metadata | {
        "steps": state.step, "skipped_updates": state.skipped_total,
        "final_loss": state.history[-1][1] if state.history else None,
        # The checkpoint step the last worker start resumed from (0: from scratch): a restart after a
        # failure, or an earlier, shorter run of the same run_name (resumed into more steps).
        "resumed_from_step": first_step,
    })
    if logger:
        logger.close()
