"""The preprocess stage: raw text in, a versioned dataset directory of token shards out.

What it is: :func:`preprocess` (the stage) and :func:`load_manifest` (the reader helper for the
dataset-directory contract in DESIGN.md). The stage runs as plain Ray tasks over work units:

1. plan work units from the inputs (flows/readers.py) -- before any Ray work, so a missing path or
   a corpus without usable text fails fast;
2. pass 1 (Ray): read, clean and hash each unit's documents, write them to ``_work/clean/``;
3. driver: drop exact duplicates keeping the first in input order; train the tokenizer on a
   deterministic sample (unless ``data.tokenizer_path`` is given);
4. pass 2 (Ray): tokenize each unit, append ``<|endoftext|>``, route documents to train/val by
   content hash, write ``_work/tok/``; fine-tuning records go the same way into ``_work/sft/``;
5. driver: pack the per-unit files into shards in unit order, then ``manifest.json``, then ``DONE``.

Every per-unit file is written under a temporary name and renamed, the unit's ``.json`` last, so a
killed run resumes with the units it finished. The output directory is
``<workdir>/preprocess/<hash of config, input fingerprints and tokenizer>/``; a finished one is
reused. What it is not: a reader of training batches (flows/train_data.py), or a streaming
pipeline for corpora that do not fit on the workdir's disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import resource
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flows import readers, sft
from flows.config import BUILTIN_CORPUS, DataConfig, PipelineConfig, flatten, stable_hash, to_dict
from flows.outputs import atomic_write_text, is_done, mark_done, sha256_file, stage_dir
from flows.readers import InputError, InputFile, UnitStats, WorkUnit
from flows.train_data import FORMAT_VERSION, DataError, read_manifest

log = logging.getLogger(__name__)

STAGE = "preprocess"
_BATCH_CHARS = 1 << 20  # characters per encode_batch call: amortises the call, bounds memory
# Config keys that name inputs rather than shape the output: the hash uses the inputs' content
# fingerprints instead, and the worker count never changes the output.
_NOT_HASHED = ("inputs", "sft_inputs", "hf_dataset", "hf_config", "hf_split", "hf_data_files",
               "tokenizer_path", "num_workers")


# A dataset directory that is missing, unfinished or corrupt: one error type, raised by the one
# reader of the contract (flows/train_data.py), for preprocessing and training alike.
DatasetError = DataError


# --------------------------------------------------------------------------- the stage


def preprocess(cfg: PipelineConfig) -> Path:
    """Run the stage (or reuse its finished output) and return the dataset directory."""
    from flows.tracking import stage_run

    started = time.time()
    data = cfg.data
    workdir = Path(cfg.workdir)
    sources = _resolve(data, workdir)  # every input error surfaces here, before Ray and MLflow
    key = stable_hash(
        STAGE, FORMAT_VERSION, {k: v for k, v in to_dict(data).items() if k not in _NOT_HASHED},
        [f.fingerprint for f in sources.text], [f.fingerprint for f in sources.sft],
        sources.tokenizer.sha256() if sources.tokenizer else None,
    )
    out = stage_dir(workdir, STAGE, key)
    with stage_run(cfg.tracking, workdir, STAGE, flatten({"data": to_dict(data)})) as tracker:
        tracker.set_tags({"gptflow.dataset_dir": str(out.resolve())})
        if is_done(out):
            manifest = load_manifest(out)
            log.info("preprocess: reusing finished dataset %s (same config and inputs)", out)
            tracker.set_tags({"gptflow.reused": "true"})
            _log_tracking(tracker, out, manifest, sources, time.time() - started, reused=True)
            return out
        manifest = _build(cfg, sources, out)
        manifest_text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        atomic_write_text(out / "manifest.json", manifest_text)
        mark_done(out, {"manifest_sha256": hashlib.sha256(manifest_text.encode()).hexdigest()})
        shutil.rmtree(out / "_work", ignore_errors=True)
        seconds = time.time() - started
        _log_tracking(tracker, out, manifest, sources, seconds)
        log.info("%s", summary(manifest, out, seconds))
    return out


@dataclasses.dataclass
class _Sources:
    text: list[InputFile]
    sft: list[InputFile]
    tokenizer: Any  # gptcore.Tokenizer given by data.tokenizer_path, or None
    labels: list[str]  # what the inputs were called (for the MLflow dataset)
    skipped: Counter


def _resolve(data: DataConfig, workdir: Path) -> _Sources:
    skipped: Counter = Counter()
    specs: list[str] = []
    labels: list[str] = []
    for spec in data.inputs:
        if spec == BUILTIN_CORPUS:
            from flows import corpus

            specs.append(str(corpus.materialize(workdir / "corpus" / corpus.NAME)))
        elif spec.startswith("builtin:"):
            raise InputError(f"data.inputs: unknown builtin corpus {spec!r}; the only one is {BUILTIN_CORPUS!r}")
        else:
            specs.append(spec)
        labels.append(spec)
    text = readers.describe(readers.resolve_paths(tuple(specs), "data.inputs", skipped))
    if data.hf_dataset:
        text.append(readers.export_hf_dataset(data, workdir / STAGE / "_hf"))
        labels.append(f"hf:{data.hf_dataset}")
    sft_files = readers.describe(readers.resolve_paths(data.sft_inputs, "data.sft_inputs", skipped))
    for f in sft_files:
        if f.fmt not in ("jsonl", "json"):
            raise InputError(f"data.sft_inputs: {f.path} must be .jsonl or .json (prompt/completion or messages records)")
    if text:
        readers.check_usable(text, "data.inputs")
        readers.check_parquet_field(text, data.text_field, "data.inputs")
    elif not sft_files:
        raise InputError("data.inputs: no input files (and no data.hf_dataset or data.sft_inputs)")
    if sft_files:
        readers.check_usable(sft_files, "data.sft_inputs")
    tokenizer = None
    if data.tokenizer_path:
        from gptcore import Tokenizer

        try:
            tokenizer = Tokenizer.load(data.tokenizer_path)
        except (OSError, ValueError) as e:
            raise InputError(f"data.tokenizer_path={data.tokenizer_path!r}: {e}") from e
    elif not text:
        raise InputError("data.tokenizer_path is required when there is no pretraining text to train one on")
    return _Sources(text, sft_files, tokenizer, labels or list(data.sft_inputs), skipped)


def _build(cfg: PipelineConfig, sources: _Sources, out: Path) -> dict[str, Any]:
    from flows.cluster import cluster_cpus, ensure_ray

    data = cfg.data
    work = out / "_work"
    for sub in ("clean", "tok", "sft"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    _remove_partial_files(out)
    units = readers.plan_units(sources.text, data) if sources.text else []
    sft_units = readers.plan_units(sources.sft, data) if sources.sft else []
    ensure_ray(cfg.cluster)
    workers = data.num_workers or cluster_cpus()
    log.info("preprocess -> %s: %d work units (+%d fine-tuning) on %d workers", out, len(units), len(sft_units), workers)
    timings: dict[str, float] = {}

    t = time.time()
    clean_meta = _run_units(clean_unit, units, workers, "clean", work / "clean", data=data, work=str(work))
    timings["clean"] = time.time() - t

    t = time.time()
    keep, duplicates = _dedup(units, work, data.dedup)
    tokenizer = _tokenizer(sources.tokenizer, units, keep, work, data, out)
    timings["tokenizer"] = time.time() - t
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"

    t = time.time()
    tok_path = str(out / "tokenizer.json")
    tok_meta = _run_units(
        tokenize_unit, units, workers, "tokenize", work / "tok",
        per_unit={u.key: {"keep": keep[u.key]} for u in units},
        data=data, work=str(work), tokenizer_path=tok_path, dtype=dtype,
    )
    sft_meta = _run_units(
        sft_unit, sft_units, workers, "sft", work / "sft",
        data=data, work=str(work), tokenizer_path=tok_path, dtype=dtype,
    )
    timings["tokenize"] = time.time() - t

    t = time.time()
    splits = {
        split: _pack(work / "tok", [f"{u.key}.{split}" for u in units], out, split, dtype, data.shard_tokens)
        for split in ("train", "val")
    }
    splits["sft"] = _pack_sft(work / "sft", [u.key for u in sft_units], out, dtype, data.shard_tokens)
    timings["pack"] = time.time() - t

    dropped: Counter = Counter(sources.skipped)
    repaired: Counter = Counter()
    for m in clean_meta.values():
        sft.merge_counts(dropped, m["dropped"])
        sft.merge_counts(repaired, m["repaired"])
    if duplicates:
        dropped["duplicate"] += duplicates
    sft_dropped: Counter = Counter()
    for m in sft_meta.values():
        sft.merge_counts(sft_dropped, m["dropped"])
        sft.merge_counts(repaired, m["repaired"])
    kept = sum(int(keep[u.key].sum()) for u in units)
    for split in ("train", "val"):
        splits[split]["documents"] = sum(m["documents"][split] for m in tok_meta.values())
    peak = max([m["peak_rss_mb"] for m in (*clean_meta.values(), *tok_meta.values(), *sft_meta.values())] or [0])
    cpu = {name: round(sum(m.get("cpu_s", 0.0) for m in metas.values()), 3)
           for name, metas in (("clean", clean_meta), ("tokenize", tok_meta))}
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "tokenizer_sha256": sha256_file(out / "tokenizer.json"),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "pad_id": tokenizer.pad_id,
        "config": to_dict(data),
        "inputs": [{"path": f.path, "fingerprint": f.fingerprint, "kind": "text"} for f in sources.text]
        + [{"path": f.path, "fingerprint": f.fingerprint, "kind": "sft"} for f in sources.sft],
        "documents": {"kept": kept, "dropped": dict(sorted(dropped.items())), "repaired": dict(sorted(repaired.items()))},
        "sft_examples": {"kept": splits["sft"]["examples"], "dropped": dict(sorted(sft_dropped.items()))},
        "splits": splits,
        "work_units": {"text": len(units), "sft": len(sft_units), "workers": workers},
        "stats": {"seconds": {k: round(v, 3) for k, v in timings.items()}, "worker_peak_rss_mb": peak,
                  "worker_cpu_seconds": cpu},
    }


def _remove_partial_files(out: Path) -> None:
    """Temporary files of a killed run: never valid, never reused."""
    for p in out.rglob(".*.tmp-*"):
        p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- Ray scheduling


def _run_units(fn: Callable[..., dict], units: Sequence[WorkUnit], workers: int, desc: str, meta_dir: Path,
               per_unit: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> dict[str, dict]:
    """Run `fn(unit, **kwargs)` as one Ray task per unfinished unit, at most `workers` at once.

    A unit whose ``<key>.json`` exists finished in an earlier (killed) run and is not redone.
    """
    import ray
    from tqdm import tqdm

    results: dict[str, dict] = {}
    todo = []
    for unit in units:
        meta = meta_dir / f"{unit.key}.json"
        if meta.is_file():
            results[unit.key] = json.loads(meta.read_text())
        else:
            todo.append(unit)
    if len(results):
        log.info("%s: %d of %d work units already done (resuming)", desc, len(results), len(units))
    remote = ray.remote(fn).options(num_cpus=1, max_retries=2)
    pending: dict[Any, str] = {}
    queue = iter(todo)
    with tqdm(total=len(units), initial=len(results), desc=desc, unit="unit", disable=None) as bar:
        while True:
            while len(pending) < workers and (unit := next(queue, None)) is not None:
                pending[remote.remote(unit, **kwargs, **(per_unit or {}).get(unit.key, {}))] = unit.key
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
                bar.update(1)
    return results


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _UnitWriter:
    """Files of one work unit, written under temporary names and renamed together by commit()."""

    def __init__(self, directory: Path, key: str):
        self.dir = directory
        self.key = key
        self._tmp: dict[str, Path] = {}
        self._files: dict[str, Any] = {}

    def open(self, suffix: str) -> Any:
        tmp = self.dir / f".{self.key}{suffix}.tmp-{os.getpid()}"
        self._tmp[suffix] = tmp
        self._files[suffix] = open(tmp, "wb")
        return self._files[suffix]

    def commit(self, meta: dict[str, Any]) -> dict[str, Any]:
        for f in self._files.values():
            f.close()
        for suffix, tmp in self._tmp.items():
            os.replace(tmp, self.dir / f"{self.key}{suffix}")
        atomic_write_text(self.dir / f"{self.key}.json", json.dumps(meta, sort_keys=True))  # last: "done"
        return meta


# --------------------------------------------------------------------------- pass 1: clean + hash


def doc_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def clean_unit(unit: WorkUnit, data: DataConfig, work: str) -> dict[str, Any]:
    """Ray task: the unit's cleaned documents (concatenated UTF-8), their offsets and hashes."""
    cpu = time.process_time()
    stats = UnitStats()
    out = _UnitWriter(Path(work) / "clean", unit.key)
    f = out.open(".txt")
    offsets = [0]
    hashes = bytearray()
    for doc in readers.iter_documents(unit, data, stats):
        raw = doc.strip().encode("utf-8")
        f.write(raw)
        offsets.append(offsets[-1] + len(raw))
        hashes += hashlib.blake2b(raw, digest_size=16).digest()
    with out.open(".npz") as idx:
        np.savez(idx, offsets=np.asarray(offsets, dtype=np.int64),
                 hashes=np.frombuffer(bytes(hashes), dtype=np.uint8).reshape(-1, 16))
    return out.commit({
        "documents": len(offsets) - 1, "bytes": offsets[-1], "dropped": dict(stats.dropped),
        "repaired": dict(stats.repaired), "peak_rss_mb": _peak_rss_mb(), "cpu_s": time.process_time() - cpu,
    })


def _load_index(work: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(work / "clean" / f"{key}.npz") as z:
        return z["offsets"], z["hashes"]


def _dedup(units: Sequence[WorkUnit], work: Path, enabled: bool) -> tuple[dict[str, np.ndarray], int]:
    """Keep-mask per unit: the first document with given content, in input order, wins."""
    seen: set[bytes] = set()
    keep: dict[str, np.ndarray] = {}
    duplicates = 0
    for unit in units:
        _, hashes = _load_index(work, unit.key)
        mask = np.ones(len(hashes), dtype=bool)
        if enabled:
            blob = hashes.tobytes()
            for i in range(len(hashes)):
                h = blob[16 * i : 16 * i + 16]
                if h in seen:
                    mask[i] = False
                else:
                    seen.add(h)
        duplicates += int((~mask).sum())
        keep[unit.key] = mask
    return keep, duplicates


def _kept_docs(work: Path, key: str, select: np.ndarray) -> Iterator[str]:
    offsets, _ = _load_index(work, key)
    raw = (work / "clean" / f"{key}.txt").read_bytes()
    for i in np.flatnonzero(select):
        yield raw[offsets[i] : offsets[i + 1]].decode("utf-8")


def _tokenizer(given: Any, units: Sequence[WorkUnit], keep: dict[str, np.ndarray], work: Path,
               data: DataConfig, out: Path) -> Any:
    """The given tokenizer, one a killed run already trained, or a new one from a sample."""
    from gptcore import Tokenizer

    path = out / "tokenizer.json"
    if given is not None:
        atomic_write_text(path, given.to_json())
        return given
    if path.is_file():
        return Tokenizer.load(path)
    total = 0
    for unit in units:
        offsets, _ = _load_index(work, unit.key)
        total += int(np.diff(offsets)[keep[unit.key]].sum())
    if total == 0:
        raise InputError("data.inputs: no usable text: every document was dropped (see the counts logged above)")
    # A fixed-seed coin per document (in input order) picks the sample: deterministic, spread over
    # the whole corpus, and independent of the worker count.
    rate = min(1.0, data.tokenizer_sample_chars / total)
    rng = np.random.default_rng(data.seed)

    def sample() -> Iterator[str]:
        chars = 0
        for unit in units:
            mask = keep[unit.key] & (rng.random(len(keep[unit.key])) < rate)
            for doc in _kept_docs(work, unit.key, mask):
                yield doc
                chars += len(doc)
                if chars >= data.tokenizer_sample_chars:
                    return

    started = time.time()
    tok = Tokenizer.train(sample(), vocab_size=data.vocab_size, min_frequency=data.min_frequency)
    atomic_write_text(path, tok.to_json())
    log.info("trained a %d-token tokenizer in %.1f s", tok.vocab_size, time.time() - started)
    return tok


# --------------------------------------------------------------------------- pass 2: tokenize


_TOKENIZERS: dict[str, Any] = {}


def _load_tokenizer(path: str) -> Any:
    """One tokenizer per worker process; tokenizers' own thread pool is off (one CPU per task)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if path not in _TOKENIZERS:
        from gptcore import Tokenizer

        _TOKENIZERS[path] = Tokenizer.load(path)
    return _TOKENIZERS[path]


def _is_val(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """Validation documents: the first 8 hash bytes as a number below fraction * 2**64."""
    h64 = np.ascontiguousarray(hashes[:, :8]).view("<u8").ravel()
    return h64 < np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))


def tokenize_unit(unit: WorkUnit, data: DataConfig, work: str, tokenizer_path: str, dtype: str,
                  keep: np.ndarray) -> dict[str, Any]:
    """Ray task: token ids of the unit's kept documents, each followed by <|endoftext|>, per split."""
    tok = _load_tokenizer(tokenizer_path)
    cpu = time.process_time()  # after the (once per worker) tokenizer load
    wdir = Path(work)
    offsets, hashes = _load_index(wdir, unit.key)
    raw = (wdir / "clean" / f"{unit.key}.txt").read_bytes()
    val = _is_val(hashes, data.val_fraction)
    np_dtype = np.dtype(dtype).newbyteorder("<")
    out = _UnitWriter(wdir / "tok", unit.key)
    files = {"train": out.open(".train"), "val": out.open(".val")}
    tokens = {"train": 0, "val": 0}
    documents = {"train": 0, "val": 0}
    batch: list[int] = []
    chars = 0

    def flush() -> None:
        texts = [raw[offsets[i] : offsets[i + 1]].decode("utf-8") for i in batch]
        encoded = tok.encode_batch(texts, allow_special=False)  # "<|endoftext|>" in text is just text
        for split in ("train", "val"):
            chosen = [ids for i, ids in zip(batch, encoded, strict=True) if val[i] == (split == "val")]
            if not chosen:
                continue
            n = sum(map(len, chosen)) + len(chosen)
            arr = np.fromiter(_with_eot(chosen, tok.eot_id), dtype=np_dtype, count=n)
            files[split].write(arr.tobytes())
            tokens[split] += n
            documents[split] += len(chosen)

    for i in np.flatnonzero(keep):
        batch.append(int(i))
        chars += int(offsets[i + 1] - offsets[i])
        if chars >= _BATCH_CHARS:
            flush()
            batch, chars = [], 0
    if batch:
        flush()
    return out.commit({"tokens": tokens, "documents": documents, "peak_rss_mb": _peak_rss_mb(),
                       "cpu_s": time.process_time() - cpu})


def _with_eot(docs: list[list[int]], eot: int) -> Iterator[int]:
    for ids in docs:
        yield from ids
        yield eot


def sft_unit(unit: WorkUnit, data: DataConfig, work: str, tokenizer_path: str, dtype: str) -> dict[str, Any]:
    """Ray task: fine-tuning examples as token ids, a parallel uint8 loss mask, example lengths."""
    tok = _load_tokenizer(tokenizer_path)
    stats = UnitStats()
    np_dtype = np.dtype(dtype).newbyteorder("<")
    out = _UnitWriter(Path(work) / "sft", unit.key)
    ids_f, mask_f = out.open(".bin"), out.open(".mask.bin")
    lengths: list[int] = []

    def examples() -> Iterator[list[tuple[str, bool]]]:
        for seg in unit.segments:
            try:
                with readers.open_input(seg.file) as fh:
                    for record in readers.iter_records(fh, seg, stats):
                        parts = sft.segments(record, data, stats)
                        if parts is not None:
                            yield parts
            except OSError as e:
                stats.dropped["unreadable"] += 1
                log.error("cannot read %s: %s", seg.file.path, e)

    for ids, mask in sft.tokenize_examples(examples(), tok, _BATCH_CHARS):
        ids_f.write(np.asarray(ids, dtype=np_dtype).tobytes())
        mask_f.write(np.asarray(mask, dtype=np.uint8).tobytes())
        lengths.append(len(ids))
    with out.open(".len.npy") as f:
        np.save(f, np.asarray(lengths, dtype=np.int64))
    return out.commit({
        "examples": len(lengths), "tokens": int(sum(lengths)), "dropped": dict(stats.dropped),
        "repaired": dict(stats.repaired), "peak_rss_mb": _peak_rss_mb(),
    })


# --------------------------------------------------------------------------- packing


class _ShardWriter:
    """Consecutive shard files ``<split>/NNNNN.bin`` (and masks), each renamed into place when full."""

    def __init__(self, out: Path, split: str, shard_tokens: int, itemsize: int, masked: bool = False):
        self.out, self.split, self.cap, self.itemsize, self.masked = out, split, shard_tokens, itemsize, masked
        (out / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        self._f: Any = None

    def _start(self) -> None:
        name = f"{len(self.shards):05d}"
        self._name = name
        self._tmp = self.out / self.split / f".{name}.bin.tmp-{os.getpid()}"
        self._f = open(self._tmp, "wb")
        self._h = hashlib.sha256()
        if self.masked:
            self._mtmp = self.out / self.split / f".{name}.mask.bin.tmp-{os.getpid()}"
            self._mf = open(self._mtmp, "wb")
            self._mh = hashlib.sha256()
        self._tokens = 0
        self._examples = 0

    @property
    def room(self) -> int:
        return self.cap - self._tokens if self._f else self.cap

    def write(self, data: bytes, mask: bytes | None = None, examples: int = 0) -> None:
        if self._f is None:
            self._start()
        self._f.write(data)
        self._h.update(data)
        if self.masked and mask is not None:
            self._mf.write(mask)
            self._mh.update(mask)
        self._tokens += len(data) // self.itemsize
        self._examples += examples

    def close_shard(self) -> None:
        if self._f is None:
            return
        self._f.close()
        entry: dict[str, Any] = {"file": f"{self.split}/{self._name}.bin", "tokens": self._tokens,
                                 "sha256": self._h.hexdigest()}
        os.replace(self._tmp, self.out / entry["file"])
        if self.masked:
            self._mf.close()
            entry["mask_file"] = f"{self.split}/{self._name}.mask.bin"
            entry["mask_sha256"] = self._mh.hexdigest()
            entry["examples"] = self._examples
            os.replace(self._mtmp, self.out / entry["mask_file"])
        self.shards.append(entry)
        self._f = None


def _pack(src: Path, names: list[str], out: Path, split: str, dtype: str, shard_tokens: int) -> dict[str, Any]:
    """Concatenate per-unit token files in unit order, cut into shards of exactly shard_tokens."""
    itemsize = np.dtype(dtype).itemsize
    writer = _ShardWriter(out, split, shard_tokens, itemsize)
    for name in names:
        with open(src / name, "rb") as f:
            while True:
                block = f.read(min(writer.room, 1 << 22) * itemsize)
                if not block:
                    break
                writer.write(block)
                if writer.room == 0:
                    writer.close_shard()
    writer.close_shard()
    return {"shards": writer.shards, "tokens": sum(s["tokens"] for s in writer.shards)}


def _pack_sft(src: Path, keys: list[str], out: Path, dtype: str, shard_tokens: int) -> dict[str, Any]:
    """Like _pack, but an example never spans two shards (a longer one gets a shard to itself)."""
    itemsize = np.dtype(dtype).itemsize
    writer = _ShardWriter(out, "sft", shard_tokens, itemsize, masked=True)
    for key in keys:
        lengths = np.load(src / f"{key}.len.npy")
        with open(src / f"{key}.bin", "rb") as f, open(src / f"{key}.mask.bin", "rb") as m:
            for n in lengths.tolist():
                if writer.room < n and writer.room < shard_tokens:
                    writer.close_shard()
                writer.write(f.read(n * itemsize), m.read(n), examples=1)
    writer.close_shard()
    return {
        "shards": writer.shards, "tokens": sum(s["tokens"] for s in writer.shards),
        "examples": sum(s["examples"] for s in writer.shards),
    }


# --------------------------------------------------------------------------- reading the output


def load_manifest(dataset_dir: str | Path, verify: bool = False) -> dict[str, Any]:
    """The manifest of a finished dataset directory, after checking every shard file exists (and,
    with verify=True, matches its sha256). Raises DatasetError naming the offending file."""
    return read_manifest(dataset_dir, verify=verify)


def read_shard(dataset_dir: str | Path, shard: dict[str, Any], dtype: str) -> np.ndarray:
    """A shard's token ids as a read-only memory map."""
    return np.memmap(Path(dataset_dir) / shard["file"], dtype=np.dtype(dtype).newbyteorder("<"), mode="r")


# --------------------------------------------------------------------------- reporting


def summary(manifest: dict[str, Any], out: Path, seconds: float) -> str:
    docs = manifest["documents"]
    dropped = ", ".join(f"{k}={v}" for k, v in docs["dropped"].items()) or "none"
    repaired = ", ".join(f"{k}={v}" for k, v in docs.get("repaired", {}).items()) or "none"
    splits = "; ".join(
        f"{name}: {e['tokens']:,} tokens in {len(e['shards'])} shards" for name, e in manifest["splits"].items()
    )
    return (
        f"preprocess done in {seconds:.1f} s -> {out}\n"
        f"  documents kept {docs['kept']:,}; dropped: {dropped}; repaired: {repaired}\n"
        f"  {splits} ({manifest['dtype']}, vocab {manifest['vocab_size']})"
    )


def _log_tracking(tracker: Any, out: Path, manifest: dict[str, Any], sources: _Sources, seconds: float,
                  reused: bool = False) -> None:
    docs = manifest["documents"]
    metrics: dict[str, float] = {"documents.kept": docs["kept"], "seconds": seconds}
    metrics.update({f"documents.dropped.{k}": v for k, v in docs["dropped"].items()})
    metrics.update({f"documents.repaired.{k}": v for k, v in docs.get("repaired", {}).items()})
    metrics.update({f"sft_examples.dropped.{k}": v for k, v in manifest.get("sft_examples", {}).get("dropped", {}).items()})
    for split, entry in manifest["splits"].items():
        metrics[f"tokens.{split}"] = entry["tokens"]
        metrics[f"shards.{split}"] = len(entry["shards"])
    total = sum(e["tokens"] for e in manifest["splits"].values())
    if not reused and seconds > 0:
        metrics["tokens_per_s"] = total / seconds
    stats = manifest.get("stats", {})
    if stats.get("worker_peak_rss_mb"):
        metrics["worker_peak_rss_mb"] = stats["worker_peak_rss_mb"]
    metrics.update({f"seconds.{k}": v for k, v in stats.get("seconds", {}).items()})
    tracker.log_metrics(metrics)
    tracker.log_artifact(out / "manifest.json")
    tracker.log_artifact(out / "tokenizer.json")
    files = manifest["inputs"]
    tracker.log_input_dataset(
        name=", ".join(sources.labels)[:200] or "corpus",
        source=files[0]["path"] if len(files) == 1 else str(Path(files[0]["path"]).parent),
        digest=stable_hash([f["fingerprint"] for f in files], length=32),
        context="preprocess",
        profile={"files": len(files), "documents": docs["kept"], "tokens": total},
    )
