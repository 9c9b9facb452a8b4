"""The preprocess stage: raw text in, a versioned dataset directory of token shards out.

What it is: :func:`preprocess` (the stage) and :func:`fingerprint` (what, besides the data
section, names its output: the inputs' content). The stage runs as plain Ray tasks over work units:

1. locate and check the inputs (flows/data/sources.py) and plan work units from them
   (flows/data/units.py) -- before any Ray work, so a missing path or a corpus without usable text
   fails fast;
2. pass 1 (Ray, flows/data/tasks.py): read, clean and hash each unit's documents (and their
   ``val_piece_chars`` pieces), write them to ``_work/clean/``;
3. driver: drop exact duplicates keeping the first in input order (and near-duplicates,
   flows/data/curate/); train the tokenizer on a deterministic sample (unless
   ``data.tokenizer_path`` is given); choose the val split by content hash -- whole documents, or
   pieces of long ones (flows/data/splits.py);
4. pass 2 (Ray): tokenize each unit's spans into train/val, each followed by ``<|endoftext|>``,
   write ``_work/tok/``; fine-tuning records go the same way into ``_work/sft/``;
5. driver: pack the per-unit files into shards in unit order (fine-tuning examples into ``sft``
   and, held out by hash, ``sft_val``), then ``manifest.json`` (flows/data/manifest.py).

Every per-unit file is written under a temporary name and renamed, the unit's ``.json`` last, so a
killed run resumes with the units it finished. The pipeline runner names the output directory
``<workdir>/preprocess/<hash of the data section and the inputs' fingerprints>/`` and writes its
DONE; a finished one is reused.

What it is not: a reader of training batches (flows/train/windows.py), or a streaming pipeline for
corpora that do not fit on the workdir's disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flows.config import DataConfig, to_dict
from flows.context import StepContext
from flows.data import inputs, knowledge_sources, manifest, sources
from flows.data.curate import driver as curate_stage
from flows.data.dataset import FORMAT_VERSION
from flows.data.inputs import InputError, InputFile
from flows.data.manifest import check_drops
from flows.data.shards import load_index, pack_sft, pack_tokens
from flows.data.sources import BaseModel, Sources
from flows.data.splits import assign_val, check_val_possible, sft_holdout
from flows.data.tasks import clean_unit, sft_unit, tokenize_unit
from flows.data.units import WorkUnit, plan_units
from flows.progress import Progress
from flows.workdir import atomic_write_text

log = logging.getLogger(__name__)

STAGE = "preprocess"


def preprocess(
    data: DataConfig, out_dir: Path, ctx: StepContext, base: BaseModel | None = None
) -> Path:
    """Build the dataset directory `out_dir` from the inputs `data` names; return it.

    With `base`, the data is tokenized with the base's tokenizer (no BPE training;
    data.tokenizer_path must then be empty) and fine-tuning records are written in its chat
    template; an example longer than the base's context is dropped (counted). The pipeline runner
    decided that `out_dir` (named by :func:`fingerprint` and `data`) must be built; it writes DONE
    after this returns. A killed earlier attempt's finished work units are reused.
    """
    started = time.time()
    out = Path(out_dir)
    if base is not None:
        if data.tokenizer_path:
            raise InputError(
                f"data.tokenizer_path={data.tokenizer_path!r} and model.base are both set: with a "
                "base model the data is tokenized with the base's tokenizer; leave "
                "data.tokenizer_path empty"
            )
        data = dataclasses.replace(data, tokenizer_path=str(base.bundle))
    # Every input error surfaces here, before Ray work.
    found = sources.resolve(data, ctx, ctx.workdir / STAGE)
    found.base = base
    ctx.tracker.log_params({"data": to_dict(data)})
    ctx.tracker.set_tags({"gptflow.dataset_dir": str(out.resolve())})
    built = _build(data, ctx, found, out)
    atomic_write_text(out / "manifest.json", json.dumps(built, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out / "_work", ignore_errors=True)
    seconds = time.time() - started
    manifest.log_tracking(ctx.tracker, out, built, found, seconds)
    log.info("%s", manifest.summary(built, out, seconds))
    return out


def fingerprint(data: DataConfig, ctx: StepContext) -> dict[str, Any]:
    """What, beside `data`'s shaping settings, determines the dataset: the inputs' content.

    Cheap on an unchanged corpus (file fingerprints are cached by path, size and mtime): the runner
    calls it to name the output directory before deciding whether anything must run.
    """
    located = sources.locate(data, ctx)
    extra = (
        {"knowledge": knowledge_sources.fingerprint(data, ctx.fingerprints)}
        if data.knowledge
        else {}
    )
    return extra | {
        "format_version": FORMAT_VERSION,
        "text": [f.fingerprint for f in located.text],
        "sft": [f.fingerprint for f in located.sft],
        "hf": [
            data.hf_dataset,
            data.hf_config,
            data.hf_split,
            [ctx.fingerprints.sha256(p) if Path(p).is_file() else p for p in data.hf_data_files],
        ]
        if data.hf_dataset
        else None,
        "tokenizer": ctx.fingerprints.sha256(data.tokenizer_path)
        if data.tokenizer_path and Path(data.tokenizer_path).is_file()
        else data.tokenizer_path,
        # The evaluation sets decontamination removes: their content, not only their paths.
        **(
            {
                "decontaminate": [
                    ctx.fingerprints.sha256(p) if Path(p).is_file() else p
                    for p in data.curate.decontaminate
                ]
            }
            if data.curate.decontaminate
            else {}
        ),
    }


def local_input_files(data: DataConfig) -> list[str]:
    """The local files `data` reads (data.inputs, data.sft_inputs, data.hf_data_files), found
    without reading them: what a scheduler checks for being settled before it fingerprints them.
    URLs and builtin corpora are left out: a store's object appears whole, and a builtin is written
    whole."""
    skipped: Counter = Counter()
    files: list[str] = []
    for key, specs in (("data.inputs", data.inputs), ("data.sft_inputs", data.sft_inputs)):
        local = tuple(s for s in specs if not s.startswith("builtin:") and not inputs.is_url(s))
        files += inputs.resolve_paths(local, key, skipped)
    return files + [
        str(Path(p).resolve())
        for p in data.hf_data_files
        if not inputs.is_url(p) and Path(p).is_file()
    ]


def _build(data: DataConfig, ctx: StepContext, found: Sources, out: Path) -> dict[str, Any]:
    """Run the passes over `found`'s work units into `out`; return the manifest."""
    from flows.cluster import cluster_cpus, ensure_ray

    work = _work_dirs(out)
    units, sft_units, fixed_text, fixed_sft = _plan(data, found)
    ensure_ray(ctx.cluster)
    workers = data.num_workers or cluster_cpus()
    log.info(
        "preprocess -> %s: %d work units (+%d fine-tuning) on %d workers",
        out,
        len(units),
        len(sft_units),
        workers,
    )
    timings: dict[str, float] = {}

    t = time.time()
    eval_path = curate_stage.eval_ngrams(data, work)
    clean_meta = _run_units(
        clean_unit,
        units,
        workers,
        "clean",
        work / "clean",
        progress=ctx.progress,
        data=data,
        work=str(work),
        eval_path=eval_path,
    )
    timings["clean"] = time.time() - t
    check_drops(clean_meta, "documents", "data.inputs", data.max_drop_fraction)

    t = time.time()
    keep, duplicates = _dedup(units, work, data.dedup)
    near = curate_stage.duplicates(units, work, keep, data, workers, clean_meta, duplicates)
    timings["curate"] = time.time() - t
    tokenizer = _tokenizer(
        found.tokenizer, units, keep, work, data, out, keep_settings=found.base is not None
    )
    assignment, spans = (
        assign_val(units, keep, work, data, tokenizer, fixed_text)
        if units
        else ({"mode": "none"}, {})
    )
    timings["tokenizer"] = time.time() - t  # from the curate step's start: it includes curation
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"

    t = time.time()
    tok_meta, sft_meta = _tokenize_pass(
        data, work, out, units, sft_units, spans, workers, dtype, found.base, ctx.progress
    )
    timings["tokenize"] = time.time() - t

    t = time.time()
    splits = _pack(data, work, out, units, sft_units, dtype, fixed_sft)
    timings["pack"] = time.time() - t
    return manifest.build(
        data,
        found,
        out,
        manifest.Passes(
            units=units,
            sft_units=sft_units,
            workers=workers,
            clean_meta=clean_meta,
            keep=keep,
            duplicates=duplicates,
            near=near,
            tokenizer=tokenizer,
            dtype=dtype,
            assignment=assignment,
            tok_meta=tok_meta,
            sft_meta=sft_meta,
            splits=splits,
            timings=timings,
        ),
    )


def _work_dirs(out: Path) -> Path:
    """``out/_work`` with the passes' folders; a killed run's temporary files removed."""
    work = out / "_work"
    for sub in ("clean", "tok", "sft"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    _remove_partial_files(out)
    return work


def _plan(
    data: DataConfig, found: Sources
) -> tuple[list[WorkUnit], list[WorkUnit], dict[str, bool], dict[str, bool]]:
    """The work units of the pretraining text and of the fine-tuning records, each with the
    knowledge files' units last, and those units' fixed splits (unit key -> held out?)."""
    units = plan_units(found.text, data) if found.text else []
    sft_units = plan_units(found.sft, data) if found.sft else []
    if units:
        check_val_possible(found.text, data)  # from the file sizes alone, before any Ray work
    # Knowledge files are units of their own whose split is fixed: trained facts train, held-out
    # facts and phrasings are validation only. A dataset of knowledge alone thus has the held-out
    # facts' statements as its val split, whatever its size.
    know_text, know_sft = found.knowledge_files()
    fixed_text = _append_units(units, know_text, data)
    return units, sft_units, fixed_text, _append_units(sft_units, know_sft, data)


def _tokenize_pass(
    data: DataConfig,
    work: Path,
    out: Path,
    units: list[WorkUnit],
    sft_units: list[WorkUnit],
    spans: dict[str, dict[str, Any]],
    workers: int,
    dtype: str,
    base: BaseModel | None,
    progress: Progress,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Pass 2: the pretraining text's spans and the fine-tuning records as token ids, per unit."""
    tok_path = str(out / "tokenizer.json")
    tok_meta = _run_units(
        tokenize_unit,
        units,
        workers,
        "tokenize",
        work / "tok",
        per_unit=spans,
        progress=progress,
        data=data,
        work=str(work),
        tokenizer_path=tok_path,
        dtype=dtype,
    )
    sft_meta = _run_units(
        sft_unit,
        sft_units,
        workers,
        "sft",
        work / "sft",
        progress=progress,
        data=data,
        work=str(work),
        tokenizer_path=tok_path,
        dtype=dtype,
        chat=base is not None,
        max_tokens=base.context_length if base else 0,
    )
    check_drops(sft_meta, "examples", "data.sft_inputs", data.max_drop_fraction)
    return tok_meta, sft_meta


def _pack(
    data: DataConfig,
    work: Path,
    out: Path,
    units: list[WorkUnit],
    sft_units: list[WorkUnit],
    dtype: str,
    fixed_sft: dict[str, bool],
) -> dict[str, dict[str, Any]]:
    """The per-unit token files packed into each split's shards, in unit order."""
    splits = {
        split: pack_tokens(
            work / "tok", [f"{u.key}.{split}" for u in units], out, split, dtype, data.shard_tokens
        )
        for split in ("train", "val")
    }
    sft_keys = [u.key for u in sft_units]
    held_out = sft_holdout(work / "sft", sft_keys, data, fixed_sft)
    splits["sft"] = pack_sft(
        work / "sft",
        sft_keys,
        out,
        "sft",
        dtype,
        data.shard_tokens,
        {k: ~v for k, v in held_out.items()},
    )
    splits["sft_val"] = pack_sft(
        work / "sft", sft_keys, out, "sft_val", dtype, data.shard_tokens, held_out
    )
    return splits


def _append_units(
    units: list[WorkUnit], files: list[tuple[InputFile, bool]], data: DataConfig
) -> dict[str, bool]:
    """Plan each knowledge file as units of its own after `units` (in place); their fixed split
    (held out or not) by unit key."""
    fixed: dict[str, bool] = {}
    for f, held_out in files:
        for u in plan_units([f], data):
            unit = WorkUnit(len(units), u.segments)
            units.append(unit)
            fixed[unit.key] = held_out
    return fixed


def _remove_partial_files(out: Path) -> None:
    """Temporary files of a killed run: never valid, never reused."""
    for p in out.rglob(".*.tmp-*"):
        p.unlink(missing_ok=True)


def _run_units(
    fn: Callable[..., dict],
    units: Sequence[WorkUnit],
    workers: int,
    desc: str,
    meta_dir: Path,
    per_unit: dict[str, dict[str, Any]] | None = None,
    progress: Progress | None = None,
    **kwargs: Any,
) -> dict[str, dict]:
    """Run `fn(unit, **kwargs)` as one Ray task per unfinished unit, at most `workers` at once,
    reporting units done and documents/s to `progress`.

    A unit whose ``<key>.json`` exists finished in an earlier (killed) run and is not redone.
    """
    import ray

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
    # SPREAD: work units go to every node of a cluster; Ray's default packs tasks onto the driver's
    # node until it is busy (seen: all 32 units of a two-node run on one node).
    remote = ray.remote(fn).options(num_cpus=1, max_retries=2, scheduling_strategy="SPREAD")
    pending: dict[Any, str] = {}
    queue = iter(todo)
    progress = progress or Progress()
    started, docs = time.monotonic(), 0
    if todo:
        progress.update(f"preprocess {desc}", len(results), len(units), "units")
    while True:
        while len(pending) < workers and (unit := next(queue, None)) is not None:
            pending[remote.remote(unit, **kwargs, **(per_unit or {}).get(unit.key, {}))] = unit.key
        if not pending:
            break
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            results[pending.pop(ref)] = result = ray.get(ref)
            docs += (
                result["documents"] if isinstance(result.get("documents"), int) else 0
            )  # pass 1's count
            rate = {"docs_per_s": docs / (time.monotonic() - started)} if docs else {}
            progress.update(f"preprocess {desc}", len(results), len(units), "units", **rate)
    return results


def _dedup(
    units: Sequence[WorkUnit], work: Path, enabled: bool
) -> tuple[dict[str, np.ndarray], int]:
    """Keep-mask per unit: the first document with given content, in input order, wins.

    Driver memory is the documents' 16-byte hashes and a sort of them (about 50 bytes a document),
    whatever the documents' size: no text, and no Python object per document.
    """
    hashes = [load_index(work, u.key)[1] for u in units]
    counts = [len(h) for h in hashes]
    keep = np.ones(sum(counts), dtype=bool)
    if enabled and len(keep):
        h = np.concatenate(hashes).view("<u8")  # (N, 2): each 128-bit hash as two words
        del hashes
        order = np.lexsort((h[:, 1], h[:, 0]))  # stable: equal hashes stay in input order
        h = h[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = (h[1:] != h[:-1]).any(axis=1)
        del h
        keep[:] = False
        keep[order[first]] = True
    masks = np.split(keep, np.cumsum(counts)[:-1]) if units else []
    return {u.key: m for u, m in zip(units, masks, strict=True)}, int((~keep).sum())


def _kept_docs(work: Path, key: str, select: np.ndarray) -> Iterator[str]:
    """The selected documents of a unit's cleaned text, read one at a time (not the whole file)."""
    offsets, _ = load_index(work, key)
    with open(work / "clean" / f"{key}.txt", "rb") as f:
        for i in np.flatnonzero(select):
            f.seek(int(offsets[i]))
            yield f.read(int(offsets[i + 1] - offsets[i])).decode("utf-8")


def _tokenizer(
    given: Any,
    units: Sequence[WorkUnit],
    keep: dict[str, np.ndarray],
    work: Path,
    data: DataConfig,
    out: Path,
    keep_settings: bool = False,
) -> Any:
    """The given tokenizer, one a killed run already trained, or a new one from a sample.

    `keep_settings`: a base model's tokenizer keeps its tokenizer_config.json (special tokens, chat
    template, stop tokens) beside tokenizer.json, for the workers that render its chat template."""
    from gptcore import Tokenizer

    path = out / "tokenizer.json"
    if given is not None:
        atomic_write_text(path, given.to_json())
        if keep_settings and given.has_settings:
            atomic_write_text(
                out / "tokenizer_config.json", json.dumps(given.config(), indent=2) + "\n"
            )
        return given
    if path.is_file():
        return Tokenizer.load(path)
    total = 0
    for unit in units:
        offsets, _ = load_index(work, unit.key)
        total += int(np.diff(offsets)[keep[unit.key]].sum())
    if total == 0:
        raise InputError(
            "data.inputs: no usable text: every document was dropped (see the counts logged above)"
        )
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
