"""Benchmark of curation (issue #25): what each filter gets right, and what curation costs.

What it measures, in one run, as ratios against baselines in the same run:
  * near-dup quality on a synthetic set with ground truth (originals; exact copies; copies with 2 %
    of words replaced or deleted; copies with half their words edited; unrelated documents):
    exact copies found 100 %, 2 %-edited >= 85 %, half-edited and unrelated merged <= 1 %;
    and the MinHash hashing speed against datasketch on the builtin corpus;
  * language filter on short multilingual chat texts (tests/data/curate/multilingual.jsonl), keeping
    English: >= 90 % of English kept, <= 3 % of what is kept in another language; pycld2 vs
    py3langid vs langid, speed and accuracy;
  * quality rules (the published thresholds): >= 97 % of well-formed prose kept, >= 90 % of
    boilerplate, lists, lorem ipsum, code and symbol soup dropped; and what they do to the builtin
    corpus;
  * throughput: preprocess of the builtin corpus with every filter on, 2 workers vs 1 (target
    >= 1.6x), and curation's overhead: every filter on vs none (target <= +50 %), with a given
    tokenizer, Ray started before the clock;
  * driver memory: peak RSS of the driver (a fresh process with its own Ray) on 10 copies of the
    corpus vs 1 (target <= 1.2x).

Usage: python bench/curate.py [--scale 10] [--skip-memory]
Writes bench/results/curate.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import numpy as np  # noqa: E402

from flows.config import (  # noqa: E402
    ClusterConfig,
    CurateConfig,
    DataConfig,
    NearDedupConfig,
    PipelineConfig,
    QualityConfig,
    TrackingConfig,
)
from flows.data.curate.apply import Curator  # noqa: E402
from flows.data.curate.minhash import MinHasher  # noqa: E402
from flows.data.curate.shuffle import (  # noqa: E402
    bucket_partition,  # noqa: E402
    components,
    write_bands,
)
from tests.data.curate.texts import boilerplate, edited, prose, unrelated  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ALL_ON = CurateConfig(quality=QualityConfig(enabled=True), languages=("en",), pii="redact")
ALL_OFF = CurateConfig(near_dedup=NearDedupConfig(enabled=False), pii="off")


def near_dup_quality(n: int = 300) -> dict:
    docs, kind, truth = [], [], {}
    for i in range(n):
        original = unrelated(50_000 + i, 250)
        docs.append(original)
        kind.append("original")
        o = len(docs) - 1
        for k, text in (
            ("exact", original),
            ("edit_2pct", edited(original, 0.02, seed=i)),
            ("edit_50pct", edited(original, 0.5, seed=i)),
            ("unrelated", unrelated(90_000 + i, 250)),
        ):
            docs.append(text)
            kind.append(k)
            if k in ("exact", "edit_2pct"):
                truth[len(docs) - 1] = o
    h = MinHasher()
    t = time.perf_counter()
    keys = np.stack([h.band_keys(d) for d in docs])
    hash_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/u.npy", "wb") as f:
            bounds = write_bands(f, 0, keys, np.arange(len(docs)), 8)
        for p in range(8):
            bucket_partition([(f"{tmp}/u.npy", bounds.tolist())], p, f"{tmp}/{p}.npy")
        comp = components([f"{tmp}/{p}.npy" for p in range(8)], f"{tmp}/d.npy")
        pairs = np.load(f"{tmp}/d.npy")
    found = {int(d): int(r) for d, r in pairs.tolist()}
    rate = {
        k: sum(found.get(i) == truth.get(i) and i in found for i, x in enumerate(kind) if x == k)
        / kind.count(k)
        for k in ("exact", "edit_2pct")
    }
    merged = {
        k: sum(i in found for i, x in enumerate(kind) if x == k) / kind.count(k)
        for k in ("edit_50pct", "unrelated")
    }
    return {
        "documents": len(docs),
        "found": rate,
        "merged_wrongly": merged,
        "clusters": comp["clusters"],
        "signature_us_per_doc": hash_s / len(docs) * 1e6,
    }


def hashing_speed(corpus: Path) -> dict:
    from datasketch import MinHash

    from flows.data.curate.quality import words_of

    docs = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    h = MinHasher()
    t = time.perf_counter()
    for d in docs:
        h.signature(d)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    for d in docs:
        w = [x for x in words_of(d) if x]
        m = MinHash(num_perm=112)
        m.update_batch([" ".join(w[i : i + 5]).encode() for i in range(max(1, len(w) - 4))])
    theirs = time.perf_counter() - t
    return {
        "ours_s": ours,
        "datasketch_s": theirs,
        "speedup": theirs / ours,
        "documents": len(docs),
    }


def language() -> dict:
    import langid
    import py3langid.langid as p3
    import pycld2

    from flows.data.curate.language import LanguageFilter

    rows = [
        json.loads(x)
        for x in (ROOT / "tests/data/curate/multilingual.jsonl").read_text().splitlines()
    ]
    ident = p3.LanguageIdentifier.from_model_file(p3.MODEL_FILE, norm_probs=True)
    old = langid.langid.LanguageIdentifier.from_modelstring(langid.langid.model, norm_probs=True)
    tools = {
        "pycld2": lambda t: pycld2.detect(t)[2][0][1].split("-")[0],
        "py3langid": lambda t: ident.classify(t)[0],
        "langid": lambda t: old.classify(t)[0],
    }
    out: dict = {"texts": len(rows), "languages": len({r["lang"] for r in rows})}
    for name, f in tools.items():
        f("warm up")
        t = time.perf_counter()
        preds = [f(r["text"]) for r in rows]
        out[name] = {
            "us_per_text": (time.perf_counter() - t) / len(rows) * 1e6,
            "accuracy": sum(p == r["lang"] for p, r in zip(preds, rows, strict=True)) / len(rows),
        }
    keep = LanguageFilter(("en",))
    kept = [r for r in rows if keep.filter(r["text"]) is None]
    english = sum(r["lang"] == "en" for r in rows)
    out["filter_en"] = {
        "english_kept": sum(r["lang"] == "en" for r in kept) / english,
        "other_in_kept": sum(r["lang"] != "en" for r in kept) / max(1, len(kept)),
    }
    return out


def quality(corpus: Path) -> dict:
    c = Curator(
        CurateConfig(
            quality=QualityConfig(enabled=True),
            pii="off",
            near_dedup=NearDedupConfig(enabled=False),
        )
    )
    kept = sum(c.apply(prose(s)).text is not None for s in range(500)) / 500
    dropped: Counter = Counter()
    total: Counter = Counter()
    for s in range(50):
        for k, text in boilerplate(s).items():
            total[k] += 1
            dropped[k] += c.apply(text).text is None
    docs = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    t = time.perf_counter()
    verdicts = [c.apply(d) for d in docs]
    seconds = time.perf_counter() - t
    size = sum(map(len, docs))
    return {
        "prose_kept": kept,
        "bad_dropped": sum(dropped.values()) / sum(total.values()),
        "bad_dropped_by_kind": {k: dropped[k] / total[k] for k in total},
        "builtin": {
            "documents_dropped": sum(v.text is None for v in verdicts) / len(docs),
            "bytes_dropped": sum(
                len(d) for d, v in zip(docs, verdicts, strict=True) if v.text is None
            )
            / size,
            "reasons": dict(Counter(v.reason for v in verdicts if v.reason).most_common()),
            "ms_per_doc": seconds / len(docs) * 1e3,
        },
    }


def stage(corpus: Path, tok: Path, workdir: Path, workers: int, curate: CurateConfig) -> dict:
    from flows.data.dataset import read_manifest
    from flows.pipeline import run

    cfg = PipelineConfig(
        workdir=str(workdir),
        tracking=TrackingConfig(enabled=False),
        data=DataConfig(
            inputs=(str(corpus),), tokenizer_path=str(tok), num_workers=workers, curate=curate
        ),
    )
    t = time.perf_counter()
    out = run(cfg, only=["preprocess"])[0].out
    seconds = time.perf_counter() - t
    m = read_manifest(out)
    return {"seconds": seconds, "kept": m["documents"]["kept"], "phases": m["stats"]["seconds"]}


def _spin(_: int) -> int:
    s = 0
    for i in range(3_000_000):
        s += i * i
    return s


def parallel_ceiling() -> float:
    """What 2 processes get over 1 on this machine right now (pure CPU work): the ceiling that the
    2-worker ratio is to be read against on a shared machine."""
    import multiprocessing as mp

    t = time.perf_counter()
    for i in range(4):
        _spin(i)
    serial = time.perf_counter() - t
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_spin, range(4))
    return serial / (time.perf_counter() - t)


def throughput(corpus: Path, tok: Path, tmp: Path) -> dict:
    from flows.cluster import ensure_ray

    ensure_ray(ClusterConfig(num_cpus=2))
    stage(corpus, tok, tmp / "warm", 2, ALL_OFF)  # worker processes and imports warm
    r = {
        "on_1": stage(corpus, tok, tmp / "a", 1, ALL_ON),
        "on_2": stage(corpus, tok, tmp / "b", 2, ALL_ON),
        "off_2": stage(corpus, tok, tmp / "c", 2, ALL_OFF),
    }
    r["speedup_2_vs_1"] = r["on_1"]["seconds"] / r["on_2"]["seconds"]
    r["machine_2_vs_1_ceiling"] = parallel_ceiling()
    r["curation_overhead"] = r["on_2"]["seconds"] / r["off_2"]["seconds"] - 1
    return r


def child(corpus: str, tok: str, workdir: str) -> None:
    from flows.cluster import ensure_ray

    ensure_ray(ClusterConfig(num_cpus=2))
    r = stage(Path(corpus), Path(tok), Path(workdir), 2, ALL_ON)
    r["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(r))


def memory(corpus: Path, tok: Path, tmp: Path, scale: int) -> dict:
    out = {}
    for factor in (1, scale):
        dest = tmp / f"x{factor}"
        dest.mkdir()
        for k in range(
            factor
        ):  # the first copy as it is, the others with 30 % of the words edited:
            for i, f in enumerate(
                sorted(corpus.glob("*.txt"))
            ):  # distinct documents, not near-dups
                text = f.read_text()
                (dest / f"{k:02d}-{f.name}").write_text(
                    edited(text, 0.3, seed=k * 100_000 + i) if k else text
                )
        res = subprocess.run(
            [sys.executable, __file__, "--child", str(dest), str(tok), str(tmp / f"w{factor}")],
            check=True,
            capture_output=True,
            text=True,
        )
        out[f"x{factor}"] = json.loads(res.stdout.strip().splitlines()[-1])
    out["driver_rss_ratio"] = (
        out[f"x{scale}"]["driver_peak_rss_mb"] / out["x1"]["driver_peak_rss_mb"]
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        child(*args.child)
        return
    from flows.data import corpus as builtin
    from gptcore import Tokenizer

    RESULTS.mkdir(exist_ok=True)
    docs = builtin.materialize(RESULTS / "python-docs")
    tok = RESULTS / "curate-tokenizer.json"
    if not tok.is_file():
        Tokenizer.train([f.read_text() for f in sorted(docs.glob("*.txt"))], vocab_size=4096).save(
            tok
        )
    report: dict = {
        "near_dup": near_dup_quality(),
        "hashing": hashing_speed(docs),
        "language": language(),
        "quality": quality(docs),
    }
    print(json.dumps(report, indent=2))
    with tempfile.TemporaryDirectory(prefix="bench-curate-") as tmp:
        report["throughput"] = throughput(docs, tok, Path(tmp))
        print(json.dumps(report["throughput"], indent=2))
        if not args.skip_memory:
            from flows.cluster import shutdown_ray

            shutdown_ray()
            report["memory"] = memory(docs, tok, Path(tmp), args.scale)
    report["load_average"] = os.getloadavg()
    (RESULTS / "curate.json").write_text(json.dumps(report, indent=2) + "\n")
    nd, lang, q, th = (
        report["near_dup"],
        report["language"]["filter_en"],
        report["quality"],
        report["throughput"],
    )
    print(
        f"near-dup: exact {nd['found']['exact']:.0%}, "
        f"2%-edited {nd['found']['edit_2pct']:.0%} found; "
        f"half-edited {nd['merged_wrongly']['edit_50pct']:.1%}, "
        f"unrelated {nd['merged_wrongly']['unrelated']:.1%} merged"
    )
    print(
        f"language: {lang['english_kept']:.1%} of English kept, "
        f"{lang['other_in_kept']:.1%} of kept not English"
    )
    print(f"quality: {q['prose_kept']:.1%} prose kept, {q['bad_dropped']:.1%} bad text dropped")
    print(
        f"throughput: 2 workers {th['speedup_2_vs_1']:.2f}x 1 worker "
        f"(2 processes of pure CPU work: {th['machine_2_vs_1_ceiling']:.2f}x); "
        f"curation overhead {th['curation_overhead']:+.0%}"
    )
    if "memory" in report:
        print(f"driver peak RSS at {args.scale}x / 1x: {report['memory']['driver_rss_ratio']:.2f}")


if __name__ == "__main__":
    main()
