"""Training telemetry: throughput and MFU, memory, gradient norms, rank 0's asynchronous MLflow
writes, loss curves.
"""

from __future__ import annotations

import logging
import queue
import resource
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Steps after each (re)start left out of the steady-state throughput: allocator and thread-pool
# warm-up.
WARMUP_TIMING_STEPS = 3


def gradient_norm(model: torch.nn.Module) -> float:
    """L2 norm of all gradients (before clipping)."""
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/statm, in pages)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Dense peak FLOP/s per device for MFU when the config gives none. GPUs: vendor figures for
# bf16/fp16 tensor cores (fp32 uses TF32 rates). CPUs have no honest vendor figure; these are per
# core, the matmul rates measured on this project's AVX-512 machines (STACK-NOTES: ~877 GFLOP/s bf16
# and ~206 fp32 on 2 threads), so CPU "MFU" reads as a fraction of achievable matmul throughput.
_GPU_PEAK = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "L4": 121e12,
}

_CPU_PEAK_PER_CORE = {"bf16": 440e9, "bf16-autocast": 440e9, "fp16": 440e9, "fp32": 103e9}


def default_peak_flops(precision: str, use_gpu: bool, threads: int) -> float:
    if use_gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in _GPU_PEAK.items():
            if key in name:
                return peak if precision != "fp32" else peak / 2
        return 0.0  # unknown GPU: no MFU rather than a made-up one
    return _CPU_PEAK_PER_CORE[precision] * threads


class AsyncLogger:
    """Rank 0's per-step MLflow writes on a thread, so a sqlite commit never stalls a training
    step."""

    def __init__(self, tracker: Any):
        self.tracker = tracker
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                kind, payload, step = item
                if kind == "metrics":
                    self.tracker.log_metrics(payload, step=step)
                elif kind == "text":
                    self.tracker.log_text(payload, step)
                elif kind == "figure":
                    self.tracker.log_figure(payload, step)
            except Exception:  # tracking must never kill training; the failure is logged
                log.exception("MLflow logging failed")
            finally:
                self.q.task_done()

    def metrics(self, d: dict[str, float], step: int) -> None:
        self.q.put(("metrics", d, step))

    def text(self, text: str, name: str) -> None:
        self.q.put(("text", text, name))

    def figure(self, fig: Any, name: str) -> None:
        self.q.put(("figure", fig, name))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()


def loss_figure(history: list[list[float]], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = np.asarray(history, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(h[:, 0], h[:, 1], label="train loss")
    ok = np.isfinite(h[:, 2])
    if ok.any():
        ax.plot(h[ok, 0], h[ok, 2], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


@dataclass
class Throughput:
    """Tokens and FLOPs per step, and the steady-state clock: the steps timed after each (re)start's
    warm-up (WARMUP_TIMING_STEPS)."""

    tokens_per_step: int
    flops_per_token: float
    peak: float
    """Peak FLOP/s of all the workers' devices together; 0: unknown (no MFU)."""
    first_step: int
    timed_steps: int = 0
    timed_seconds: float = 0.0

    def add(self, step: int, dt: float) -> None:
        """`step` (just done) took `dt` seconds."""
        if step - self.first_step > WARMUP_TIMING_STEPS:
            self.timed_steps += 1
            self.timed_seconds += dt

    def tokens_per_s(self) -> float:
        return (
            self.tokens_per_step * self.timed_steps / self.timed_seconds
            if self.timed_seconds > 0
            else float("nan")
        )

    def figures(self, tokens_seen: int) -> dict[str, Any]:
        """The run's steady-state speed, for the last checkpoint's report."""
        tps = self.tokens_per_s()
        return {
            "tokens_per_s": tps,
            "mfu": tps * self.flops_per_token / self.peak if self.peak > 0 else float("nan"),
            "timed_steps": self.timed_steps,
            "tokens_seen": tokens_seen,
        }


def memory_figures(
    rss_before_model: int, use_gpu: bool, device: torch.device, world: int
) -> dict[str, float]:
    """The most memory any rank used (a collective), and rank 0's GPU peak, for the last report."""
    mem = torch.tensor(
        [float(peak_rss_bytes()), float(peak_rss_bytes() - rss_before_model)],
        dtype=torch.float64,
        device=device,
    )
    if world > 1:
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    figures = {
        "peak_rss_bytes_max_rank": float(mem[0]),
        "rss_growth_bytes_max_rank": float(mem[1]),
    }  # peak minus before the model was built
    if use_gpu:
        figures["peak_gpu_bytes_rank0"] = float(torch.cuda.max_memory_allocated(device))
    return figures
