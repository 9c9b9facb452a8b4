"""Distillation: what alpha and temperature do to a short run, and what the teacher costs per step.

What it measures, in one process (plain PyTorch loops over the training data index; the distill
step's own loss, gptcore.Distillation, and nothing of Ray or DeepSpeed, whose path
tests/train/test_distill.py checks):
  1. a teacher (the small preset, 4 x 128) trained for --teacher-steps, and its validation loss;
  2. the tiny student (4 x 64), the same initial weights and batches every time, trained for --steps
     on labels alone and distilled at each (alpha, temperature) of the grid: validation loss of
     each;
  3. step time of a distilled step (teacher forward + fused loss) against a labels-only step, and of
     the fused chunked distillation loss against the plain one on materialised logits (both models'
     (B, T, vocab) logits, log-softmaxes, KL): ratios in the same run.

What it is not: a test (nothing here asserts).

    .venv/bin/python bench/distill.py [--steps 60] [--teacher-steps 200] [--data DATASET_DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from common import save, timed

from flows.train.windows import TokenWindows
from gptcore import GPT, Distillation, preset

GRID = ((1.0, 1.0), (0.5, 1.0), (0.2, 1.0), (0.0, 1.0), (0.5, 2.0), (0.2, 2.0), (0.5, 4.0))
T, BATCH = 64, 16


def train(
    model: GPT,
    data: TokenWindows,
    steps: int,
    teacher: GPT | None = None,
    alpha: float = 1.0,
    tau: float = 1.0,
    seed: int = 0,
    warmup: int = 4,
) -> GPT:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    for step in range(steps):
        x, y, _ = data.train_batch(seed, step, 0, 1, BATCH)
        loss = _loss(model, torch.from_numpy(x), torch.from_numpy(y), teacher, alpha, tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
    return model.eval()


def _loss(
    model: GPT, x: torch.Tensor, y: torch.Tensor, teacher: GPT | None, alpha: float, tau: float
):
    kd = None
    if teacher is not None:
        with torch.no_grad():
            kd = Distillation(teacher.features(x), teacher.lm_head.weight, alpha, tau)
    return model(x, y, return_logits=False, distill=kd)[1]


def _plain_kd_loss(
    model: GPT, teacher: GPT, x: torch.Tensor, y: torch.Tensor, alpha: float, tau: float
):
    logits, _ = model(x)
    with torch.no_grad():
        t_logits, _ = teacher(x)
    s, t = logits.flatten(0, 1), t_logits.flatten(0, 1)
    kl = F.kl_div(
        F.log_softmax(s / tau, -1),
        F.log_softmax(t / tau, -1),
        log_target=True,
        reduction="batchmean",
    )
    return alpha * F.cross_entropy(s, y.flatten()) + (1 - alpha) * tau * tau * kl


@torch.no_grad()
def val_loss(model: GPT, val: TokenWindows) -> float:
    losses = [
        float(model(torch.from_numpy(x), torch.from_numpy(y), return_logits=False)[1])
        for x, y, _ in val.eval_batches(16, BATCH)
    ]
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--teacher-steps", type=int, default=200)
    ap.add_argument(
        "--data", help="a dataset directory (default: a small one made from stdlib docstrings)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    data_dir = args.data
    if not data_dir:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "train"))
        from train_fixtures import make_dataset

        data_dir = str(
            make_dataset(Path(tempfile.mkdtemp(prefix="gptflow-bench-")) / "data", vocab_size=512)
        )
    data, val = TokenWindows(data_dir, "train", T), TokenWindows(data_dir, "val", T)
    vocab = json.loads((Path(data_dir) / "manifest.json").read_text())["vocab_size"]

    torch.manual_seed(0)
    teacher = train(
        GPT(preset("small", vocab_size=vocab, context_length=T)),
        data,
        args.teacher_steps,
        seed=1,
        warmup=10,
    ).requires_grad_(False)
    result: dict = {
        "steps": args.steps,
        "teacher_steps": args.teacher_steps,
        "teacher_val_loss": val_loss(teacher, val),
    }
    rows = []
    for alpha, tau in GRID:
        torch.manual_seed(3)  # the same initial student every time
        student = train(
            GPT(preset("tiny", vocab_size=vocab, context_length=T)),
            data,
            args.steps,
            None if alpha == 1.0 else teacher,
            alpha,
            tau,
        )
        rows.append({"alpha": alpha, "temperature": tau, "val_loss": val_loss(student, val)})
        print(rows[-1], flush=True)
    result["grid"] = rows

    torch.manual_seed(3)
    student = GPT(preset("tiny", vocab_size=vocab, context_length=T))
    x, y, _ = (
        torch.from_numpy(a) if a is not None else None for a in data.train_batch(0, 0, 0, 1, BATCH)
    )

    def step(fn):
        def run():
            student.zero_grad(set_to_none=True)
            fn().backward()

        return run

    labels = timed(step(lambda: _loss(student, x, y, None, 1.0, 1.0)), 3, 15)
    fused = timed(step(lambda: _loss(student, x, y, teacher, 0.5, 2.0)), 3, 15)
    plain = timed(step(lambda: _plain_kd_loss(student, teacher, x, y, 0.5, 2.0)), 3, 15)
    result["step_seconds"] = {
        "labels_only": labels,
        "distilled_fused": fused,
        "distilled_plain_logits": plain,
    }
    result["distilled_over_labels"] = fused / labels
    result["plain_over_fused"] = plain / fused
    save("distill", result)


if __name__ == "__main__":
    main()
