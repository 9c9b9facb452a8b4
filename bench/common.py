"""Shared helpers for benchmarks: timing loops, results as JSON under bench/results/."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median seconds per call of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2] if samples else 0.0


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    result = {
        **result,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path
