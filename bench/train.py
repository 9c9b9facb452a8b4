"""Training throughput and memory: Ray Train + DeepSpeed against a plain PyTorch loop, in one run.

What it measures (CPU, defaults sized for a 2-core machine):
  1. steady-state tokens/s and MFU of a plain single-process PyTorch loop (AdamW, clipping, same
     schedule) and of ``flows.train.driver.train`` with 1 worker -- same model, same batches
     (flows/train/windows.py), same thread count (1), same precision (fp32); target: Ray/DeepSpeed
     >= 0.9x plain;
  2. 2 workers with the same per-worker batch; target: >= 1.5x the tokens/s of 1 worker;
  3. peak resident memory per worker, ZeRO-0 vs ZeRO-3, 2 workers, on a larger model (gpt2-124m
     shape, short context) where optimizer state is big enough to see;
  4. the training data index (flows/train/windows.py) on synthetic sparse token shards of 10 M and
     1 B tokens (and a 10 M-token masked fine-tuning split): time and memory to open it, time per
     micro-batch drawn; target: near-constant in the dataset size (the masked split's one pass over
     its mask bytes is linear by design; those splits are small).
Steady state leaves out the first steps after start (flows.train.telemetry.WARMUP_TIMING_STEPS);
evaluation and checkpoints are outside the timed steps in both loops. Tracking is off, so MLflow
costs nothing here.

What it is not: a GPU benchmark (bench/gpu_train.sh) or a test (nothing here asserts).

    .venv/bin/python bench/train.py [--steps 60] [--data DATASET_DIR] [--skip-memory] [--index-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from flows.config import ClusterConfig, load_config  # noqa: E402
from flows.context import StepContext  # noqa: E402
from flows.pipeline import run as run_pipeline  # noqa: E402
from flows.train.loop import compute_loss  # noqa: E402
from flows.train.prepare import prepare  # noqa: E402
from flows.train.telemetry import WARMUP_TIMING_STEPS, default_peak_flops  # noqa: E402
from flows.train.windows import TokenWindows  # noqa: E402

log = logging.getLogger("bench.train")


def plain_loop(p, steps: int, threads: int) -> dict[str, float]:
    """The baseline: one process, torch AdamW, same batches, schedule and clipping as the DeepSpeed
    run."""
    from gptcore import GPT, GPTConfig

    torch.set_num_threads(threads)
    tc = p.train
    torch.manual_seed(tc.seed)
    model = GPT(GPTConfig.from_dict(p.gpt_config))
    decay = [q for q in model.parameters() if q.dim() >= 2]
    rest = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=(tc.beta1, tc.beta2),
        eps=1e-8,
    )
    data = TokenWindows(p.dataset.path, p.split, model.config.context_length)
    tokens_per_step = tc.micro_batch_size * tc.grad_accum * model.config.context_length
    timed, seconds = 0, 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        warm = min(1.0, (step + 1) / max(tc.warmup_steps, 1))
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))
        for g in opt.param_groups:
            g["lr"] = tc.lr * warm * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cos)
        for micro in range(tc.grad_accum):
            batch = data.train_batch(tc.seed, step, micro, tc.grad_accum, tc.micro_batch_size)
            (compute_loss(model, batch, torch.device("cpu")) / tc.grad_accum).backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step >= WARMUP_TIMING_STEPS:
            timed += 1
            seconds += dt
    return {"tokens_per_s": tokens_per_step * timed / seconds, "timed_steps": timed}


def _sparse_dataset(root: Path, split: str, tokens: int, shard_tokens: int = 250_000_000) -> Path:
    """A dataset directory of all-zero uint16 shards stored as sparse files: no disk, no page cache
    until read. A masked split gets sparse mask files with one loss-mask bit per 1000 tokens."""
    (root / split).mkdir(parents=True)
    (root / "tokenizer.json").write_text(
        "{}"
    )  # read_manifest checks it exists; nothing decodes here
    shards, left = [], tokens
    while left:
        n = min(left, shard_tokens)
        entry = {"file": f"{split}/{len(shards):05d}.bin", "tokens": n}
        with open(root / entry["file"], "wb") as f:
            f.truncate(2 * n)
        if split in ("sft", "sft_val"):
            entry["mask_file"] = f"{split}/{len(shards):05d}.mask.bin"
            with open(root / entry["mask_file"], "wb") as f:
                f.truncate(n)
                for pos in range(1, n, 1000):
                    f.seek(pos)
                    f.write(b"\x01")
        shards.append(entry)
        left -= n
    manifest = {
        "format_version": 1,
        "dtype": "uint16",
        "vocab_size": 50257,
        "eot_id": 0,
        "splits": {split: {"shards": shards, "tokens": tokens}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _anon_rss() -> int:
    """Anonymous resident memory of this process (Linux): what the index allocates. Plain RSS also
    counts the mapped page cache of the shards, which readahead fills far beyond the windows
    read."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return -1


def index_bench(root: Path, context_length: int, world: int, micro_batch: int) -> dict[str, dict]:
    """Open TokenWindows on synthetic datasets of growing size; time and memory of the index
    alone."""
    out: dict[str, dict] = {}
    for split, tokens in (("train", 10_000_000), ("train", 1_000_000_000), ("sft", 10_000_000)):
        data_dir = _sparse_dataset(root / f"index-{split}-{tokens}", split, tokens)
        TokenWindows(data_dir, split, context_length, 0, world).train_batch(
            0, 0, 0, 1, 1
        )  # lazy imports
        anon0 = _anon_rss()
        tracemalloc.start()
        t0 = time.perf_counter()
        data = TokenWindows(data_dir, split, context_length, world - 1, world)
        build_s = time.perf_counter() - t0
        _, build_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # Samples spread over many epochs (no cached epoch to hit): the index's share of a batch...
        draws = 2000
        t0 = time.perf_counter()
        for i in range(draws):
            data.locate(data.window_ids(0, i * 7919 * micro_batch, micro_batch))
        index_us = (time.perf_counter() - t0) / draws * 1e6
        # ...and a whole batch, reading the tokens (cold pages of a sparse file: the kernel's cost).
        t0 = time.perf_counter()
        for i in range(200):
            data.train_batch(
                seed=0, step=i * 7919, micro=0, grad_accum=1, micro_batch_size=micro_batch
            )
        batch_ms = (time.perf_counter() - t0) / 200 * 1e3
        out[f"{split}_{tokens // 1_000_000}M_tokens"] = {
            "tokens": tokens,
            "windows_this_rank": len(data),
            "build_s": build_s,
            "build_peak_traced_bytes": build_peak,
            "anon_rss_delta_bytes": _anon_rss() - anon0,
            "index_us_per_micro_batch": index_us,
            "batch_ms": batch_ms,
        }
        del data
    return out


def ray_run(cfg, workdir: Path) -> dict[str, float]:
    # A fresh workdir per run: the same config in the same workdir would be reused, not retrained.
    bundle = run_pipeline(dataclasses.replace(cfg, workdir=str(workdir)), only=["pretrain"])[-1].out
    return json.loads((bundle / "train_result.json").read_text())["metrics"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--data", help="dataset directory (default: build one from stdlib docstrings)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--memory-steps", type=int, default=4)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument(
        "--index-only", action="store_true", help="only the data-index figures (seconds, no Ray)"
    )
    ap.add_argument(
        "--index-context", type=int, default=1024, help="window length for the index figures"
    )
    ap.add_argument(
        "--index-world",
        type=int,
        default=1,
        help="ranks the index is dealt to (figures of the last)",
    )
    ap.add_argument("--out", default="bench/results/train.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    log.setLevel(logging.INFO)

    root = Path(tempfile.mkdtemp(prefix="gptflow-bench-train-"))
    log.info(
        "data index: %d-token windows, %d rank(s), synthetic sparse shards",
        args.index_context,
        args.index_world,
    )
    index = index_bench(root, args.index_context, args.index_world, args.micro_batch)
    print(
        f"| data index (T={args.index_context}, rank {args.index_world - 1} of {args.index_world}, "
        f"micro-batch {args.micro_batch}) | windows | open s | open peak (traced) | anon RSS delta "
        "| index µs per micro-batch | batch ms (reads) |\n|---|---|---|---|---|---|---|"
    )
    for name, r in index.items():
        print(
            f"| {name} | {r['windows_this_rank']:,} | {r['build_s']:.4f} "
            f"| {r['build_peak_traced_bytes'] / 2**10:,.0f} KiB "
            f"| {r['anon_rss_delta_bytes'] / 2**20:,.1f} MiB "
            f"| {r['index_us_per_micro_batch']:,.0f} | {r['batch_ms']:.2f} |"
        )
    if args.index_only:
        out = Path(args.out).with_name("train_index.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "context_length": args.index_context,
                    "world": args.index_world,
                    "micro_batch": args.micro_batch,
                    "index": index,
                },
                indent=2,
            )
        )
        print(out)
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        return
    data = args.data
    if not data:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "train"))
        from train_fixtures import make_dataset

        data = str(make_dataset(root / "data", vocab_size=512))
    base = [
        f"pretrain.data={data}",
        "tracking.enabled=false",
        f"model.preset={args.preset}",
        f"pretrain.steps={args.steps}",
        f"pretrain.micro_batch_size={args.micro_batch}",
        f"pretrain.eval_every={args.steps}",
        f"pretrain.checkpoint_every={args.steps}",
        "pretrain.eval_batches=1",
        "pretrain.precision=fp32",
        "pretrain.cpus_per_worker=1",
        "pretrain.warmup_steps=5",
        "pretrain.sample_tokens=4",
    ]
    one = load_config(None, [*base, "pretrain.num_workers=1", "pretrain.zero_stage=0"])
    two = load_config(None, [*base, "pretrain.num_workers=2", "pretrain.zero_stage=0"])

    from flows.cluster import ensure_ray

    ensure_ray(ClusterConfig(num_cpus=2))
    p = prepare(
        one.pretrain,
        one.model,
        one.pretrain.data,
        None,
        root / "plan" / "pretrain" / "bench",
        StepContext(workdir=root / "plan"),
    )
    from gptcore import GPTConfig

    flops_per_token = GPTConfig.from_dict(p.gpt_config).flops_per_token()
    peak1 = default_peak_flops("fp32", False, 1)
    results: dict[str, dict] = {}

    # Rounds interleave the three runs, so a burst of load from elsewhere on a shared machine hits
    # them alike; each run's figure is its best round (the least disturbed), all rounds are kept.
    rounds: dict[str, list[float]] = {
        "plain_1proc": [],
        "ray_ds_1worker": [],
        "ray_ds_2workers": [],
    }
    for r in range(args.rounds):
        log.info("round %d: plain PyTorch loop, 1 thread, %d steps", r, args.steps)
        rounds["plain_1proc"].append(plain_loop(p, args.steps, threads=1)["tokens_per_s"])
        log.info("round %d: Ray Train + DeepSpeed ZeRO-0, 1 worker", r)
        rounds["ray_ds_1worker"].append(ray_run(one, root / f"w1-{r}")["tokens_per_s"])
        log.info("round %d: Ray Train + DeepSpeed ZeRO-0, 2 workers", r)
        rounds["ray_ds_2workers"].append(ray_run(two, root / f"w2-{r}")["tokens_per_s"])
    for name, values in rounds.items():
        workers = 2 if "2workers" in name else 1
        best = max(values)
        results[name] = {
            "tokens_per_s": best,
            "rounds_tokens_per_s": values,
            "mfu": best * flops_per_token / (peak1 * workers),
        }

    if not args.skip_memory:
        mem = [
            f"pretrain.data={data}",
            "tracking.enabled=false",
            "model.preset=gpt2-124m",
            "model.context_length=128",
            f"pretrain.steps={args.memory_steps}",
            "pretrain.micro_batch_size=1",
            f"pretrain.eval_every={args.memory_steps}",
            f"pretrain.checkpoint_every={args.memory_steps}",
            "pretrain.eval_batches=1",
            "pretrain.num_workers=2",
            "pretrain.sample_tokens=2",
            "pretrain.warmup_steps=1",
        ]
        for stage in (0, 3):
            log.info("memory: gpt2-124m shape, ZeRO-%d, 2 workers", stage)
            r = ray_run(
                load_config(None, [*mem, f"pretrain.zero_stage={stage}"]), root / f"mem{stage}"
            )
            results[f"memory_zero{stage}_2workers"] = {
                "peak_rss_gib_per_worker": r["peak_rss_bytes_max_rank"] / 2**30
            }

    plain, r1, r2 = results["plain_1proc"], results["ray_ds_1worker"], results["ray_ds_2workers"]
    summary = {
        "model": {
            "preset": args.preset,
            **{k: p.gpt_config[k] for k in ("vocab_size", "context_length", "d_model", "n_layer")},
            "flops_per_token": flops_per_token,
        },
        "steps": args.steps,
        "micro_batch_per_worker": args.micro_batch,
        "threads_per_worker": 1,
        "peak_flops_per_core_fp32": peak1,
        "load_average_1min_at_end": os.getloadavg()[0],
        "results": results,
        "index": {
            "context_length": args.index_context,
            "world": args.index_world,
            "figures": index,
        },
        "ray_1worker_vs_plain": r1["tokens_per_s"] / plain["tokens_per_s"],
        "ray_2workers_vs_1worker": r2["tokens_per_s"] / r1["tokens_per_s"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    rows = [
        f"| {n} | {r.get('tokens_per_s', float('nan')):,.0f} | {r.get('mfu', float('nan')):.1%} |"
        for n, r in results.items()
        if "tokens_per_s" in r
    ]
    print(
        "| run | tokens/s | MFU (vs fp32 matmul peak per core) |\n|---|---|---|\n" + "\n".join(rows)
    )
    print(
        f"Ray+DS 1 worker / plain: {summary['ray_1worker_vs_plain']:.3f}x; "
        f"2 workers / 1 worker: {summary['ray_2workers_vs_1worker']:.3f}x"
    )
    for stage in (0, 3):
        r = results.get(f"memory_zero{stage}_2workers")
        if r:
            print(
                f"peak RSS per worker, ZeRO-{stage}, 2 workers, "
                f"gpt2-124m shape: {r['peak_rss_gib_per_worker']:.2f} GiB"
            )
    print(out)
    import shutil

    shutil.rmtree(root, ignore_errors=True)  # datasets, bundles and resume checkpoints of the runs


if __name__ == "__main__":
    main()
