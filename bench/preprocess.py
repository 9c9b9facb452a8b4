"""Benchmark of the preprocess stage against raw ``Tokenizer.encode_batch`` in the same run.

What it measures (issue #3):
  * overhead: end-to-end tokens/s of the stage with 1 worker vs. one process calling
    ``encode_batch`` on the same text, already in memory (target: ratio >= 0.7);
  * scaling: tokens/s with 2 workers vs. 1 worker (target: >= 1.6x on 2 cores);
  * memory (``--scale N``): peak RSS per worker and of the driver on the corpus plus one large
    ``.json.gz`` (a JSON array of records holding the same documents again), and on one N times
    larger (N copies of each file, an N times larger ``.json.gz``); each run in a fresh process with
    its own Ray, so no peak carries over. Target: both flat within 20 % from 1x to Nx.

The corpus is real text found on this machine: docstrings and comments of the installed Python
packages (one document per source file), cached under bench/results/. The stage runs with the
tokenizer given (``data.tokenizer_path``), as the baseline does, and with tracking off; Ray is
started before the clock starts (a cluster is already up when a pipeline runs). Prints ratios and
writes bench/results/preprocess-<time>.json.

Usage: python bench/preprocess.py [--mb 50] [--scale 10] [--memory-only]
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the baseline is one process on one core

from flows.cluster import ensure_ray, shutdown_ray  # noqa: E402
from flows.config import ClusterConfig, DataConfig, PipelineConfig, TrackingConfig  # noqa: E402
from flows.data.dataset import read_manifest as load_manifest  # noqa: E402
from flows.pipeline import run as run_pipeline  # noqa: E402

log = logging.getLogger("bench.preprocess")
RESULTS = Path(__file__).resolve().parent / "results"
_DOC_RE = re.compile(r'"""(.*?)"""|^[ \t]*#+ ?(.*)$', re.S | re.M)


def build_corpus(dest: Path, megabytes: int) -> Path:
    """Docstrings and comments of installed packages, one .txt per source file, until
    `megabytes`."""
    marker = dest / "DONE"
    if marker.is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    roots = sorted({Path(p) for p in sys.path if p.endswith("site-packages")}) + [
        Path(os.__file__).parent
    ]
    total, n = 0, 0
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            try:
                src = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            text = "\n".join((a or b).strip() for a, b in _DOC_RE.findall(src) if (a or b).strip())
            if len(text) < 200:
                continue
            (dest / f"{n:06d}.txt").write_text(text + "\n", encoding="utf-8")
            n += 1
            total += len(text.encode())
            if total >= megabytes * 1_000_000:
                marker.write_text(f"{n} files {total} bytes\n")
                return dest
    raise SystemExit(f"only {total / 1e6:.1f} MB of docstrings on this machine, wanted {megabytes}")


def scaled_corpus(base: Path, dest: Path, factor: int, json_gz: bool = False) -> Path:
    """`factor` copies of every document, each copy made unique by a first line (no dedup); with
    `json_gz`, the same again as one ``records.json.gz`` (a JSON array of ``{"text": ...}``)."""
    if (dest / "DONE").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(base.glob("*.txt"))
    for k in range(factor):
        for f in files:
            (dest / f"{k:02d}-{f.name}").write_text(
                f"copy {k}\n" + f.read_text(encoding="utf-8"), encoding="utf-8"
            )
    if json_gz:
        with gzip.open(dest / "records.json.gz", "wt", encoding="utf-8", compresslevel=6) as out:
            out.write("[\n")
            sep = ""
            for k in range(factor):
                for f in files:
                    out.write(
                        sep
                        + json.dumps({"text": f"json copy {k}\n" + f.read_text(encoding="utf-8")})
                    )
                    sep = ",\n"
            out.write("\n]\n")
    (dest / "DONE").write_text("done\n")
    return dest


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_run(corpus: Path, tokenizer_path: Path, workdir: Path) -> dict:
    """The stage on `corpus` with 2 workers in a fresh process (own Ray): worker and driver
    peaks."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(corpus), str(tokenizer_path), str(workdir)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(corpus: Path, tokenizer_path: Path, workdir: Path) -> None:
    ensure_ray(ClusterConfig(num_cpus=2))
    before = _rss_mb()
    r = stage(corpus, tokenizer_path, 2, workdir)
    r["driver_rss_after_ray_start_mb"] = before
    r["driver_peak_rss_mb"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # KiB on Linux
    r["input_bytes"] = sum(p.stat().st_size for p in corpus.iterdir() if p.name != "DONE")
    print(json.dumps(r))


def baseline(corpus: Path, tokenizer_path: Path) -> dict:
    """One process, text in memory, encode_batch in ~1M-character batches (what the stage uses)."""
    from gptcore import Tokenizer

    tok = Tokenizer.load(tokenizer_path)
    texts = [f.read_text(encoding="utf-8") for f in sorted(corpus.glob("*.txt"))]
    batches, batch, chars = [], [], 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if chars >= 1 << 20:
            batches.append(batch)
            batch, chars = [], 0
    batches.append(batch)
    start, cpu = time.perf_counter(), time.process_time()
    tokens = sum(
        len(ids) + 1 for b in batches for ids in tok.encode_batch(b)
    )  # +1: the eot per doc
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "cpu_seconds": cpu,
        "tokens_per_cpu_s": tokens / cpu,
        "bytes": sum(len(t.encode()) for t in texts),
    }


def stage(corpus: Path, tokenizer_path: Path, workers: int, workdir: Path) -> dict:
    cfg = PipelineConfig(
        workdir=str(workdir),
        data=DataConfig(
            inputs=(str(corpus),),
            tokenizer_path=str(tokenizer_path),
            num_workers=workers,
            min_chars=1,
        ),
        tracking=TrackingConfig(enabled=False),
    )
    start = time.perf_counter()
    out = run_pipeline(cfg, only=["preprocess"])[0].out
    seconds = time.perf_counter() - start
    m = load_manifest(out)
    tokens = sum(m["splits"][s]["tokens"] for s in ("train", "val"))
    return {
        "workers": workers,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "documents": m["documents"],
        "work_units": m["work_units"]["text"],
        "worker_peak_rss_mb": m["stats"]["worker_peak_rss_mb"],
        "phase_seconds": m["stats"]["seconds"],
        "worker_cpu_seconds": m["stats"]["worker_cpu_seconds"],
        "tokens_per_worker_cpu_s": tokens / sum(m["stats"]["worker_cpu_seconds"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=50, help="corpus size in MB of text")
    parser.add_argument(
        "--scale", type=int, default=0, help="also run on a corpus this many times larger"
    )
    parser.add_argument(
        "--memory-only", action="store_true", help="only the memory runs (needs --scale)"
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("CORPUS", "TOKENIZER", "WORKDIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.child:
        child(*map(Path, args.child))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(RESULTS / f"corpus-{args.mb}mb", args.mb)

    from gptcore import Tokenizer

    tok_path = RESULTS / "bench-tokenizer.json"
    if not tok_path.is_file():
        sample = [f.read_text(encoding="utf-8") for f in sorted(corpus.glob("*.txt"))[:2000]]
        Tokenizer.train(sample, vocab_size=8192).save(tok_path)

    report: dict = {"corpus": str(corpus), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        if not args.memory_only:
            throughput(report, corpus, tok_path, Path(tmp))
        if args.scale:
            for factor in (1, args.scale):
                mixed = scaled_corpus(
                    corpus, RESULTS / f"corpus-{args.mb}mb-x{factor}-json", factor, json_gz=True
                )
                r = memory_run(mixed, tok_path, Path(tmp) / f"x{factor}")
                report[f"memory_x{factor}"] = r
                print(
                    f"{factor}x corpus + .json.gz ({r['input_bytes'] / 1e6:.0f} MB on disk, "
                    f"{r['tokens']:,} tokens, {r['work_units']} units, {r['seconds']:.0f} s): "
                    f"peak RSS per worker {r['worker_peak_rss_mb']:.0f} MB, "
                    f"driver {r['driver_peak_rss_mb']:.0f} MB "
                    f"({r['driver_rss_after_ray_start_mb']:.0f} MB after Ray started)"
                )
            one, big = report["memory_x1"], report[f"memory_x{args.scale}"]
            for key in ("worker_peak_rss_mb", "driver_peak_rss_mb"):
                growth = big[key] / one[key] - 1
                report[f"{key}_growth"] = growth
                print(f"{key}: {growth:+.0%} from 1x to {args.scale}x (target: within 20 %)")
    report["load_average"] = os.getloadavg()
    print(f"load average during the run: {report['load_average']}")
    out = RESULTS / f"preprocess-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(out)


def throughput(report: dict, corpus: Path, tok_path: Path, tmp: Path) -> None:
    """Overhead and scaling (issue #3), in this process with one Ray instance."""
    ensure_ray(ClusterConfig(num_cpus=2))
    report["baseline"] = baseline(corpus, tok_path)
    print(
        f"baseline encode_batch: {report['baseline']['tokens_per_s']:,.0f} tokens/s "
        f"({report['baseline']['tokens']:,} tokens, {report['baseline']['bytes'] / 1e6:.1f} MB)"
    )
    for workers in (1, 2):
        r = stage(corpus, tok_path, workers, tmp / f"w{workers}")
        report[f"stage_{workers}"] = r
        print(
            f"stage, {workers} worker(s): {r['tokens_per_s']:,.0f} tokens/s "
            f"in {r['seconds']:.1f} s, peak RSS/worker {r['worker_peak_rss_mb']:.0f} MB, "
            f"phases {r['phase_seconds']}"
        )
    report["ratio_1_worker_vs_encode_batch"] = (
        report["stage_1"]["tokens_per_s"] / report["baseline"]["tokens_per_s"]
    )
    report["ratio_2_vs_1_workers"] = (
        report["stage_2"]["tokens_per_s"] / report["stage_1"]["tokens_per_s"]
    )
    print(
        f"1 worker / raw encode_batch: "
        f"{report['ratio_1_worker_vs_encode_batch']:.2f} (target >= 0.70)"
    )
    print(f"2 workers / 1 worker:        {report['ratio_2_vs_1_workers']:.2f} (target >= 1.60)")
    # Wall-clock ratios suffer when other processes share the cores; CPU time does not.
    report["cpu_ratio_stage_vs_encode_batch"] = (
        report["stage_1"]["tokens_per_worker_cpu_s"] / report["baseline"]["tokens_per_cpu_s"]
    )
    print(
        f"tokens per CPU-second, stage workers / encode_batch: "
        f"{report['cpu_ratio_stage_vs_encode_batch']:.2f}"
    )
    shutdown_ray()


if __name__ == "__main__":
    main()
