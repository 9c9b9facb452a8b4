"""What live training progress costs a step: rank 0's Sender against no progress, in one run.

What it measures: inside a Ray worker process (one CPU, like a training rank), steps of the default
pipeline's model (the `small` preset, context 128; 4-sequence micro-batches by default so that it
takes about a minute on 2 busy cores -- a smaller step makes any overhead look bigger, not smaller;
AdamW, bf16 autocast), in alternating blocks: progress off (no Sender), progress on as the pipeline
does it (a Sender to a real Relay actor, sending at most every flows.progress.SEND_EVERY_S while the
driver's forwarding thread polls it), and a worst case sending on every step. Reported: the median
step time of each and the ratios on/off (target <= 1.02) and every-step/off; since a shared
machine's noise is larger than 2 % of a step, also the Sender's own time measured inside each step,
as a fraction of the median step (the overhead, noise-free); how many updates reached the driver.

What it is not: a test (nothing here asserts) or a measure of Ray Train's own reporting (that is
``ray.train.report``, ~1.8 s a call by default: STACK-NOTES).

    .venv/bin/python bench/progress.py [--blocks 4] [--steps 8] [--preset small]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import save  # noqa: E402
from flows.progress import Progress, Sender, relayed  # noqa: E402


class _Counting(Progress):
    def __init__(self) -> None:
        self.updates = 0

    def update(
        self, task: str, done: int, total: int | None = None, unit: str = "step", **figures: float
    ) -> None:
        self.updates += 1


def _steps(relay, preset: str, blocks: int, steps: int, micro_batch: int) -> dict[str, list[float]]:
    """Runs in a Ray worker: per-step seconds for each mode, modes interleaved block by block."""
    import torch

    from gptcore import GPT
    from gptcore import preset as gpt_preset

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(gpt_preset(preset))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    T, V = model.config.context_length, model.config.vocab_size
    x = torch.randint(0, V, (micro_batch, T))
    y = torch.randint(0, V, (micro_batch, T))
    senders = {"off": Sender(None), "on": Sender(relay), "every_step": Sender(relay, every_s=0.0)}
    times: dict[str, list[float]] = {k: [] for k in senders}
    send: dict[str, list[float]] = {
        k: [] for k in senders
    }  # the Sender call alone, inside each step
    total = blocks * steps * len(senders)
    done = 0
    for _ in range(2):  # warm-up: allocator, autocast caches
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, targets=y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(blocks):
        for mode, sender in senders.items():
            for _ in range(steps):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    _, loss = model(x, targets=y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                value = float(loss.detach())
                done += 1
                t1 = time.perf_counter()
                sender.step(done, total, loss=value, tokens_per_s=micro_batch * T / (t1 - t0))
                send[mode].append(time.perf_counter() - t1)
                times[mode].append(time.perf_counter() - t0)
    return {"step": times, "send": send}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="steps per block")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--micro-batch", type=int, default=4)
    args = ap.parse_args()

    import ray

    from flows.cluster import ensure_ray
    from flows.config import ClusterConfig

    ensure_ray(ClusterConfig(num_cpus=2))
    seen = _Counting()
    with relayed(seen, "bench") as relay:
        times = ray.get(
            ray.remote(num_cpus=1)(_steps).remote(
                relay, args.preset, args.blocks, args.steps, args.micro_batch
            )
        )
    med = {k: statistics.median(v) for k, v in times["step"].items()}
    send = {k: statistics.fmean(v) for k, v in times["send"].items()}
    save(
        "progress",
        {
            "preset": args.preset,
            "micro_batch": args.micro_batch,
            "steps_per_mode": len(times["step"]["off"]),
            "median_step_s": med,
            "ratio_on_vs_off": med["on"] / med["off"],
            "ratio_every_step_vs_off": med["every_step"] / med["off"],
            # The step ratio carries the shared machine's noise; the Sender's own time inside the
            # step does not.
            "mean_sender_s_per_step": send,
            "overhead_on": send["on"] / med["off"],
            "overhead_every_step": send["every_step"] / med["off"],
            "updates_forwarded": seen.updates,
            "target": "overhead_on (and ratio_on_vs_off) <= 1.02 - 1",
        },
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
