"""The preprocess stage: raw text in, a versioned dataset directory of token shards out.

What it is: :func:`preprocess` (the stage) and :func:`fingerprint` (what, besides the data
section, names its output: the inputs' content). The stage runs as plain Ray tasks over work units:

1. plan work units from the inputs (flows/data/inputs.py) -- before any Ray work, so a missing path or
   a corpus without usable text fails fast;
2. pass 1 (Ray): read, clean and hash each unit's documents (and their ``val_piece_chars`` pieces),
   write them to ``_work/clean/``;
3. driver: drop exact duplicates keeping the first in input order; train the tokenizer on a
   deterministic sample (unless ``data.tokenizer_path`` is given); choose the val split by content
   hash -- whole documents, or pieces of long ones (:func:`assign_val`);
4. pass 2 (Ray): tokenize each unit's spans into train/val, each followed by ``<|endoftext|>``,
   write ``_work/tok/``; fine-tuning records go the same way into ``_work/sft/``;
5. driver: pack the per-unit files into shards in unit order (fine-tuning examples into ``sft``
   and, held out by hash, ``sft_val``), then ``manifest.json``.

Every per-unit file is written under a temporary name and renamed, the unit's ``.json`` last, so a
killed run resumes with the units it finished. The pipeline runner names the output directory
``<workdir>/preprocess/<hash of the data section and the inputs' fingerprints>/`` and writes its
DONE; a finished one is reused. The split choice lives in flows/data/splits.py. What it is not: a reader of training batches (flows/train/windows.py), or a streaming
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
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flows.config import DataConfig, stable_hash, to_dict
from flows.context import StepContext
from flows.data import formats, inputs, knowledge, sft
from flows.data.clean import UnitStats, is_bad_record, merge_locations, pieces
from flows.data.curate import driver as curate_stage
from flows.data.dataset import FORMAT_VERSION
from flows.data.inputs import InputError, InputFile
from flows.data.redact import redact, redact_text, redact_url
from flows.data.shards import UnitWriter, load_index, pack_sft, pack_tokens
from flows.data.splits import assign_val, check_val_possible, sft_holdout
from flows.data.units import WorkUnit, plan_units
from flows.progress import Progress
from flows.store import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

STAGE = "preprocess"

_BATCH_CHARS = 1 << 20  # characters per encode_batch call: amortises the call, bounds memory
_READ_BYTES = 4 * _BATCH_CHARS  # most bytes of cleaned text pass 2 reads at once (beyond one document)


@dataclasses.dataclass(frozen=True)
class BaseModel:
    """The pretrained base a dataset is made for (``model.base``): its bundle, whose tokenizer (and chat
    template) the data is written with, and the context length fine-tuning examples must fit."""

    bundle: Path
    context_length: int

    @classmethod
    def of(cls, bundle: Path, context_length: int | None) -> BaseModel:
        """The base in `bundle` with the pipeline's context length (None: the model's), capped by the model's."""
        own = int(json.loads((bundle / "config.json").read_text(encoding="utf-8"))["context_length"])
        return cls(bundle, min(context_length or own, own))


def preprocess(data: DataConfig, out_dir: Path, ctx: StepContext, base: BaseModel | None = None) -> Path:
    """Build the dataset directory `out_dir` from the inputs `data` names; return it.

    With `base`, the data is tokenized with the base's tokenizer (no BPE training; data.tokenizer_path
    must then be empty) and fine-tuning records are written in its chat template; an example longer
    than the base's context is dropped (counted). The pipeline runner decided that `out_dir` (named by
    :func:`fingerprint` and `data`) must be built; it writes DONE after this returns. A killed earlier
    attempt's finished work units are reused.
    """
    started = time.time()
    out = Path(out_dir)
    if base is not None:
        if data.tokenizer_path:
            raise InputError(f"data.tokenizer_path={data.tokenizer_path!r} and model.base are both set: with a base "
                             "model the data is tokenized with the base's tokenizer; leave data.tokenizer_path empty")
        data = dataclasses.replace(data, tokenizer_path=str(base.bundle))
    sources = _resolve(data, ctx)  # every input error surfaces here, before Ray work
    sources.base = base
    ctx.tracker.log_params({"data": to_dict(data)})
    ctx.tracker.set_tags({"gptflow.dataset_dir": str(out.resolve())})
    manifest = _build(data, ctx, sources, out)
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out / "_work", ignore_errors=True)
    seconds = time.time() - started
    _log_tracking(ctx.tracker, out, manifest, sources, seconds)
    log.info("%s", summary(manifest, out, seconds))
    return out


def fingerprint(data: DataConfig, ctx: StepContext) -> dict[str, Any]:
    """What, beside `data`'s shaping settings, determines the dataset: the inputs' content.

    Cheap on an unchanged corpus (file fingerprints are cached by path, size and mtime): the runner
    calls it to name the output directory before deciding whether anything must run.
    """
    sources = _locate(data, ctx)
    extra = {"knowledge": knowledge.fingerprint(data, ctx.fingerprints)} if data.knowledge else {}
    return extra | {
        "format_version": FORMAT_VERSION,
        "text": [f.fingerprint for f in sources.text],
        "sft": [f.fingerprint for f in sources.sft],
        "hf": [data.hf_dataset, data.hf_config, data.hf_split,
               [ctx.fingerprints.sha256(p) if Path(p).is_file() else p for p in data.hf_data_files]]
        if data.hf_dataset else None,
        "tokenizer": ctx.fingerprints.sha256(data.tokenizer_path) if data.tokenizer_path
        and Path(data.tokenizer_path).is_file() else data.tokenizer_path,
        # The evaluation sets decontamination removes: their content, not only their paths.
        **({"decontaminate": [ctx.fingerprints.sha256(p) if Path(p).is_file() else p
                              for p in data.curate.decontaminate]} if data.curate.decontaminate else {}),
    }


def local_input_files(data: DataConfig) -> list[str]:
    """The local files `data` reads (data.inputs, data.sft_inputs, data.hf_data_files), found without
    reading them: what a scheduler checks for being settled before it fingerprints them. URLs and
    builtin corpora are left out: a store's object appears whole, and a builtin is written whole."""
    skipped: Counter = Counter()
    files: list[str] = []
    for key, specs in (("data.inputs", data.inputs), ("data.sft_inputs", data.sft_inputs)):
        local = tuple(s for s in specs if not s.startswith("builtin:") and not inputs.is_url(s))
        files += inputs.resolve_paths(local, key, skipped)
    return files + [str(Path(p).resolve()) for p in data.hf_data_files if not inputs.is_url(p) and Path(p).is_file()]


@dataclasses.dataclass
class _Sources:
    text: list[InputFile]
    sft: list[InputFile]
    tokenizer: Any  # gptcore.Tokenizer given by data.tokenizer_path, or None
    labels: list[str]  # what the inputs were called (for the MLflow dataset)
    skipped: Counter
    knowledge: knowledge.Built | None = None  # data.knowledge verbalised (flows/data/knowledge.py)
    base: BaseModel | None = None  # the base model the data is for

    def knowledge_files(self) -> tuple[list[tuple[InputFile, bool]], list[tuple[InputFile, bool]]]:
        """The verbalised knowledge as (pretraining, fine-tuning) inputs, each file with whether it
        is held out whole (validation only): held-out facts and phrasings are never trained on."""
        if self.knowledge is None:
            return [], []
        k = self.knowledge

        def files(*pairs: tuple[Path | None, bool]) -> list[tuple[InputFile, bool]]:
            return [(inputs.describe([str(p)])[0], held) for p, held in pairs if p is not None]

        return files((k.text_train, False), (k.text_val, True)), files((k.sft_train, False), (k.sft_val, True))


def _builtin(spec: str, key: str, workdir: Path) -> str:
    """A builtin corpus spec (``builtin:NAME``) as the folder its files are written to, once."""
    from flows.data import corpus

    make = corpus.BUILTINS.get(spec)
    if make is None:
        raise InputError(f"{key}: unknown builtin corpus {spec!r}; known: {', '.join(sorted(corpus.BUILTINS))}")
    return str(make(workdir / "corpus" / spec.removeprefix("builtin:")))


def _locate(data: DataConfig, ctx: StepContext) -> _Sources:
    """The input files and their fingerprints, without reading more than a changed file's bytes."""
    skipped: Counter = Counter()
    specs = [_builtin(s, "data.inputs", ctx.workdir) if s.startswith("builtin:") else s for s in data.inputs]
    sft_specs = [_builtin(s, "data.sft_inputs", ctx.workdir) if s.startswith("builtin:") else s
                 for s in data.sft_inputs]
    text = inputs.describe(inputs.resolve_paths(tuple(specs), "data.inputs", skipped), ctx.fingerprints)
    sft_files = inputs.describe(inputs.resolve_paths(tuple(sft_specs), "data.sft_inputs", skipped), ctx.fingerprints)
    ctx.fingerprints.save()
    labels = list(data.inputs) + ([f"hf:{data.hf_dataset}"] if data.hf_dataset else [])
    return _Sources(text, sft_files, None, labels or list(data.sft_inputs), skipped)


def _resolve(data: DataConfig, ctx: StepContext) -> _Sources:
    """The located inputs, checked (usable text, parquet fields, SFT formats), plus the HF export
    and the given tokenizer: every input error surfaces here, before Ray work."""
    sources = _locate(data, ctx)
    text, sft_files = sources.text, sources.sft
    if data.knowledge:  # read, checked and verbalised here: a bad source stops the run before Ray work
        sources.knowledge = knowledge.materialize(data, ctx.workdir / STAGE / "_knowledge", ctx.fingerprints)
        sources.labels += [knowledge.label(k) for k in data.knowledge]
    know_text, know_sft = sources.knowledge_files()
    if data.hf_dataset:
        text.append(inputs.export_hf_dataset(data, ctx.workdir / STAGE / "_hf"))
    for f in sft_files:
        if f.fmt not in ("jsonl", "json"):
            raise InputError(f"data.sft_inputs: {redact_url(f.path)} must be .jsonl or .json "
                             "(prompt/completion or messages records)")
    if text:
        inputs.check_usable(text, "data.inputs")
        inputs.check_parquet_field(text, data.text_field, "data.inputs")
    elif not sft_files and not data.knowledge:
        raise InputError("data.inputs: no input files (and no data.hf_dataset, data.sft_inputs or data.knowledge)")
    if sft_files:
        inputs.check_usable(sft_files, "data.sft_inputs")
    for p in data.curate.decontaminate:
        if not Path(p).is_file():
            raise InputError(f"data.curate.decontaminate: {p} is not a file (JSONL, JSON or text of an evaluation set)")
    if data.tokenizer_path:
        from gptcore import Tokenizer

        try:
            sources.tokenizer = Tokenizer.load(data.tokenizer_path)
        except (OSError, ValueError) as e:
            raise InputError(f"data.tokenizer_path={data.tokenizer_path!r}: {e}") from e
    elif not text and not know_text:
        raise InputError("data.tokenizer_path is required when there is no pretraining text to train one on")
    return sources


def _build(data: DataConfig, ctx: StepContext, sources: _Sources, out: Path) -> dict[str, Any]:
    from flows.cluster import cluster_cpus, ensure_ray

    work = out / "_work"
    for sub in ("clean", "tok", "sft"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    _remove_partial_files(out)
    units = plan_units(sources.text, data) if sources.text else []
    sft_units = plan_units(sources.sft, data) if sources.sft else []
    if units:
        check_val_possible(sources.text, data)  # from the file sizes alone, before any Ray work
    # Knowledge files are units of their own whose split is fixed (unit key -> held out?): trained
    # facts train, held-out facts and phrasings are validation only. A dataset of knowledge alone
    # thus has the held-out facts' statements as its val split, whatever its size.
    know_text, know_sft = sources.knowledge_files()
    fixed_text = _append_units(units, know_text, data)
    fixed_sft = _append_units(sft_units, know_sft, data)
    ensure_ray(ctx.cluster)
    workers = data.num_workers or cluster_cpus()
    log.info("preprocess -> %s: %d work units (+%d fine-tuning) on %d workers", out, len(units), len(sft_units), workers)
    timings: dict[str, float] = {}

    t = time.time()
    eval_path = curate_stage.eval_ngrams(data, work)
    clean_meta = _run_units(clean_unit, units, workers, "clean", work / "clean", progress=ctx.progress,
                            data=data, work=str(work), eval_path=eval_path)
    timings["clean"] = time.time() - t
    check_drops(clean_meta, "documents", "data.inputs", data.max_drop_fraction)

    t = time.time()
    keep, duplicates = _dedup(units, work, data.dedup)
    near = curate_stage.duplicates(units, work, keep, data, workers, clean_meta, duplicates)
    timings["curate"] = time.time() - t
    tokenizer = _tokenizer(sources.tokenizer, units, keep, work, data, out, keep_settings=sources.base is not None)
    assignment, spans = assign_val(units, keep, work, data, tokenizer, fixed_text) if units else ({"mode": "none"}, {})
    timings["tokenizer"] = time.time() - t
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"

    t = time.time()
    tok_path = str(out / "tokenizer.json")
    tok_meta = _run_units(
        tokenize_unit, units, workers, "tokenize", work / "tok", per_unit=spans, progress=ctx.progress,
        data=data, work=str(work), tokenizer_path=tok_path, dtype=dtype,
    )
    sft_meta = _run_units(
        sft_unit, sft_units, workers, "sft", work / "sft", progress=ctx.progress,
        data=data, work=str(work), tokenizer_path=tok_path, dtype=dtype,
        chat=sources.base is not None, max_tokens=sources.base.context_length if sources.base else 0,
    )
    check_drops(sft_meta, "examples", "data.sft_inputs", data.max_drop_fraction)
    timings["tokenize"] = time.time() - t

    t = time.time()
    splits = {
        split: pack_tokens(work / "tok", [f"{u.key}.{split}" for u in units], out, split, dtype, data.shard_tokens)
        for split in ("train", "val")
    }
    sft_keys = [u.key for u in sft_units]
    held_out = sft_holdout(work / "sft", sft_keys, data, fixed_sft)
    splits["sft"] = pack_sft(work / "sft", sft_keys, out, "sft", dtype, data.shard_tokens,
                             {k: ~v for k, v in held_out.items()})
    splits["sft_val"] = pack_sft(work / "sft", sft_keys, out, "sft_val", dtype, data.shard_tokens, held_out)
    timings["pack"] = time.time() - t

    dropped: Counter = Counter(sources.skipped)
    repaired: Counter = Counter()
    for m in clean_meta.values():
        sft.merge_counts(dropped, m["dropped"])
        sft.merge_counts(repaired, m["repaired"])
    if duplicates:
        dropped["duplicate"] += duplicates
    if near.count:
        dropped["near_duplicate"] += near.count
    sft_dropped: Counter = Counter()
    for m in sft_meta.values():
        sft.merge_counts(sft_dropped, m["dropped"])
        sft.merge_counts(repaired, m["repaired"])
    # Where the first few drops of each reason were, in input order (units finish in any order).
    locations: dict[str, list[dict[str, Any]]] = {}
    sft_locations: dict[str, list[dict[str, Any]]] = {}
    for into, metas in ((locations, clean_meta), (sft_locations, sft_meta)):
        for key in sorted(metas):
            merge_locations(into, metas[key].get("locations", {}))
    kept = sum(int(keep[u.key].sum()) for u in units)
    for split in ("train", "val"):
        splits[split]["documents"] = sum(m["documents"][split] for m in tok_meta.values())
    total = splits["train"]["tokens"] + splits["val"]["tokens"]
    assignment["tokens"] = splits["val"]["tokens"]
    assignment["fraction"] = round(splits["val"]["tokens"] / total, 6) if total else 0.0
    peak = max([m["peak_rss_mb"] for m in (*clean_meta.values(), *tok_meta.values(), *sft_meta.values())] or [0])
    # Which Ray nodes did the work (units per node id): on a cluster, more than one.
    nodes = dict(sorted(Counter(m["node_id"] for m in (*clean_meta.values(), *tok_meta.values())
                                if m.get("node_id")).items()))
    cpu = {name: round(sum(m.get("cpu_s", 0.0) for m in metas.values()), 3)
           for name, metas in (("clean", clean_meta), ("tokenize", tok_meta))}
    curation = curate_stage.finish(out, units, work, data, clean_meta, near, kept, total,
                                   sum(int(np.diff(load_index(work, u.key)[0])[keep[u.key]].sum()) for u in units))
    return {
        "curation": curation,
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "tokenizer_sha256": sha256_file(out / "tokenizer.json"),
        **({"base_model": {"bundle": str(sources.base.bundle), "tokenizer_sha256": tokenizer.sha256(),
                           "chat_template": tokenizer.chat_template is not None,
                           "context_length": sources.base.context_length}} if sources.base else {}),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "pad_id": tokenizer.pad_id,
        # Input URLs without their credentials (the fingerprints hash the full URLs).
        "config": redact(to_dict(data)),
        "inputs": [{"path": redact_url(f.path), "fingerprint": f.fingerprint, "kind": "text"}
                   for f in sources.text]
        + [{"path": redact_url(f.path), "fingerprint": f.fingerprint, "kind": "sft"} for f in sources.sft]
        + _knowledge_inputs(data, sources),
        "documents": {"kept": kept, "dropped": dict(sorted(dropped.items())),
                      "repaired": dict(sorted(repaired.items())), "locations": dict(sorted(locations.items()))},
        "sft_examples": {"kept": splits["sft"]["examples"] + splits["sft_val"]["examples"],
                         "dropped": dict(sorted(sft_dropped.items())),
                         "locations": dict(sorted(sft_locations.items()))},
        "splits": splits,
        "val_assignment": assignment,
        **({"knowledge": k} if (k := _copy_knowledge(sources, out)) else {}),
        "work_units": {"text": len(units), "sft": len(sft_units), "workers": workers},
        "stats": {"seconds": {k: round(v, 3) for k, v in timings.items()}, "worker_peak_rss_mb": peak,
                  "worker_cpu_seconds": cpu, "worker_nodes": nodes},
    }


def _append_units(units: list[WorkUnit], files: list[tuple[InputFile, bool]], data: DataConfig) -> dict[str, bool]:
    """Plan each knowledge file as units of its own after `units` (in place); their fixed split
    (held out or not) by unit key."""
    fixed: dict[str, bool] = {}
    for f, held_out in files:
        for u in plan_units([f], data):
            unit = WorkUnit(len(units), u.segments)
            units.append(unit)
            fixed[unit.key] = held_out
    return fixed


def _knowledge_inputs(data: DataConfig, sources: _Sources) -> list[dict[str, Any]]:
    """The manifest's entries for the knowledge sources: where (no credentials) and their content."""
    if sources.knowledge is None:
        return []
    return [{"path": knowledge.label(s), "fingerprint": stable_hash(p, length=32), "kind": "knowledge",
             "content": p} for s, p in zip(data.knowledge, sources.knowledge.fingerprints, strict=True)]


def _copy_knowledge(sources: _Sources, out: Path) -> dict[str, Any] | None:
    """The facts and questions tables into the dataset (evaluation and serving read them there)."""
    if sources.knowledge is None:
        return None
    (out / "knowledge").mkdir(exist_ok=True)
    for table in sources.knowledge.tables:
        shutil.copyfile(table, out / "knowledge" / table.name)
    return {"sources": sources.knowledge.summary, "facts": "knowledge/facts.jsonl",
            "questions": "knowledge/questions.jsonl"}


def check_drops(metas: dict[str, dict[str, Any]], kept: str, key: str, limit: float) -> None:
    """Fail (InputError naming the worst files) when more than `limit` of the records the work units
    read were dropped for a bad-record reason (clean.is_bad_record): a truncated archive, a file still
    being written, a broken export. `kept` names a unit's count of records kept ("documents",
    "examples"). The units' files stay: a rerun with a higher limit resumes from them."""
    bad: Counter = Counter()
    files: dict[str, Counter] = {}
    seen = 0
    for m in metas.values():
        seen += m[kept] + sum(m["dropped"].values())
        bad.update({r: n for r, n in m["dropped"].items() if is_bad_record(r)})
        for path, reasons in m.get("bad_files", {}).items():
            files.setdefault(path, Counter()).update(reasons)
    total = sum(bad.values())
    if not total or total <= limit * seen:
        return
    worst = sorted(files.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:3]
    where = f"worst files: {'; '.join(f'{path}: {_counts(c)}' for path, c in worst)}" if worst else _counts(bad)
    more = f" (+{len(files) - len(worst)} more files)" if len(files) > len(worst) else ""
    raise InputError(f"{key}: {total} of {seen} records ({total / seen:.1%}) could not be read, more than "
                     f"data.max_drop_fraction={limit:g} allows; {where}{more}. Fix or remove them (a file "
                     "still being written? a truncated download?), or raise data.max_drop_fraction")


def _counts(c: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(c.items()))


def _remove_partial_files(out: Path) -> None:
    """Temporary files of a killed run: never valid, never reused."""
    for p in out.rglob(".*.tmp-*"):
        p.unlink(missing_ok=True)


def _run_units(fn: Callable[..., dict], units: Sequence[WorkUnit], workers: int, desc: str, meta_dir: Path,
               per_unit: dict[str, dict[str, Any]] | None = None, progress: Progress | None = None,
               **kwargs: Any) -> dict[str, dict]:
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
    # SPREAD: work units go to every node of a cluster; Ray's default packs tasks onto the driver's node
    # until it is busy (seen: all 32 units of a two-node run on one node).
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
            docs += result["documents"] if isinstance(result.get("documents"), int) else 0  # pass 1's count
            rate = {"docs_per_s": docs / (time.monotonic() - started)} if docs else {}
            progress.update(f"preprocess {desc}", len(results), len(units), "units", **rate)
    return results


def _node_id() -> str | None:
    """The Ray node this task runs on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def clean_unit(unit: WorkUnit, data: DataConfig, work: str, eval_path: str | None = None) -> dict[str, Any]:
    """Ray task: the unit's cleaned and curated documents (concatenated UTF-8), their offsets and
    hashes, and the offsets and hashes of their pieces (for the val split, see assign_val); where
    each came from, what was dropped, and their LSH band keys (flows/data/curate/unit.py). Memory:
    one document, the readers' bounded blocks, and ~60 bytes per document (and 24 per piece)."""
    from flows.data.curate.unit import UnitCuration

    cpu = time.process_time()
    stats = UnitStats()
    out = UnitWriter(Path(work) / "clean", unit.key)
    f = out.open(".txt")
    curation = UnitCuration(data, unit.index, stats, eval_path, out.open(".dropped.jsonl"))
    offsets = array("q", [0])
    hashes = bytearray()
    piece_starts = array("q")
    piece_hashes = bytearray()
    for doc in formats.iter_documents(unit, data, stats):
        body = curation.apply(doc.strip())
        if body is None:
            continue
        curation.kept(len(offsets) - 1, body)
        raw = body.encode("utf-8")  # never raises: the cleaner replaced lone surrogates
        f.write(raw)
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        hashes += digest
        if len(body) <= data.val_piece_chars:
            piece_starts.append(offsets[-1])
            piece_hashes += digest
        else:
            at = offsets[-1]
            for piece in pieces(body, data.val_piece_chars):
                b = piece.encode("utf-8")
                piece_starts.append(at)
                piece_hashes += hashlib.blake2b(b, digest_size=16).digest()
                at += len(b)
        offsets.append(offsets[-1] + len(raw))
    # Left open: commit() fsyncs and closes every file of the unit.
    np.savez(out.open(".npz"), offsets=np.frombuffer(offsets, dtype=np.int64),
             hashes=np.frombuffer(hashes, dtype=np.uint8).reshape(-1, 16),
             piece_starts=np.frombuffer(piece_starts, dtype=np.int64),
             piece_hashes=np.frombuffer(piece_hashes, dtype=np.uint8).reshape(-1, 16))
    nd = data.curate.near_dedup
    curated = curation.write(out.open(".loc.npz"), out.open(".bands.npy") if nd.enabled else None, nd.partitions)
    return out.commit({
        "documents": len(offsets) - 1, "bytes": offsets[-1], "dropped": dict(stats.dropped),
        "repaired": dict(stats.repaired), "locations": stats.locations, "bad_files": stats.bad_files,
        "peak_rss_mb": _peak_rss_mb(), "cpu_s": time.process_time() - cpu, "node_id": _node_id(),
        "curation": curated,
    })


def _dedup(units: Sequence[WorkUnit], work: Path, enabled: bool) -> tuple[dict[str, np.ndarray], int]:
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


def _tokenizer(given: Any, units: Sequence[WorkUnit], keep: dict[str, np.ndarray], work: Path,
               data: DataConfig, out: Path, keep_settings: bool = False) -> Any:
    """The given tokenizer, one a killed run already trained, or a new one from a sample.

    `keep_settings`: a base model's tokenizer keeps its tokenizer_config.json (special tokens, chat
    template, stop tokens) beside tokenizer.json, for the workers that render its chat template."""
    from gptcore import Tokenizer

    path = out / "tokenizer.json"
    if given is not None:
        atomic_write_text(path, given.to_json())
        if keep_settings and given.has_settings:
            atomic_write_text(out / "tokenizer_config.json", json.dumps(given.config(), indent=2) + "\n")
        return given
    if path.is_file():
        return Tokenizer.load(path)
    total = 0
    for unit in units:
        offsets, _ = load_index(work, unit.key)
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

_TOKENIZERS: dict[str, Any] = {}


def _load_tokenizer(path: str) -> Any:
    """One tokenizer per worker process; tokenizers' own thread pool is off (one CPU per task)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if path not in _TOKENIZERS:
        from gptcore import Tokenizer

        _TOKENIZERS[path] = Tokenizer.load(path)
    return _TOKENIZERS[path]




















def tokenize_unit(unit: WorkUnit, data: DataConfig, work: str, tokenizer_path: str, dtype: str,
                  spans: np.ndarray, val: np.ndarray) -> dict[str, Any]:
    """Ray task: token ids of the unit's spans (kept documents, or parts of them, as the driver
    assigned them to splits), each followed by <|endoftext|>, per split. The cleaned text is read
    one batch of spans at a time, never whole."""
    tok = _load_tokenizer(tokenizer_path)
    cpu = time.process_time()  # after the (once per worker) tokenizer load
    wdir = Path(work)
    np_dtype = np.dtype(dtype).newbyteorder("<")
    out = UnitWriter(wdir / "tok", unit.key)
    files = {"train": out.open(".train"), "val": out.open(".val")}
    tokens = {"train": 0, "val": 0}
    documents = {"train": 0, "val": 0}
    src = open(wdir / "clean" / f"{unit.key}.txt", "rb")

    def flush(first: int, stop: int) -> None:
        bounds = spans[first:stop].tolist()
        lo = min(start for start, _ in bounds)
        src.seek(lo)
        raw = src.read(max(end for _, end in bounds) - lo)
        texts = [raw[start - lo : end - lo].decode("utf-8") for start, end in bounds]
        encoded = tok.encode_batch(texts, allow_special=False)  # "<|endoftext|>" in text is just text
        for split in ("train", "val"):
            chosen = [ids for ids, v in zip(encoded, val[first:stop], strict=True) if v == (split == "val")]
            if not chosen:
                continue
            n = sum(map(len, chosen)) + len(chosen)
            arr = np.fromiter(_with_eot(chosen, tok.eot_id), dtype=np_dtype, count=n)
            files[split].write(arr.tobytes())
            tokens[split] += n
            documents[split] += len(chosen)

    # Batches of spans: up to the one that reaches _BATCH_CHARS of text, and never spanning more
    # than _READ_BYTES of the file (dropped duplicates lie between spans): memory is one batch,
    # whatever the unit. Spans are in file order, so both ends are found by binary search.
    chars = np.cumsum(spans[:, 1] - spans[:, 0])
    with src:
        i = 0
        while i < len(spans):
            before = chars[i] - (spans[i, 1] - spans[i, 0])
            by_chars = int(np.searchsorted(chars, before + _BATCH_CHARS, side="left")) + 1
            by_bytes = int(np.searchsorted(spans[:, 1], spans[i, 0] + _READ_BYTES, side="right"))
            stop = max(i + 1, min(by_chars, by_bytes))
            flush(i, stop)
            i = stop
    return out.commit({"tokens": tokens, "documents": documents, "peak_rss_mb": _peak_rss_mb(),
                       "cpu_s": time.process_time() - cpu, "node_id": _node_id()})


def _with_eot(docs: list[list[int]], eot: int) -> Iterator[int]:
    for ids in docs:
        yield from ids
        yield eot


def sft_unit(unit: WorkUnit, data: DataConfig, work: str, tokenizer_path: str, dtype: str, chat: bool = False,
             max_tokens: int = 0) -> dict[str, Any]:
    """Ray task: fine-tuning examples as token ids, a parallel uint8 loss mask, example lengths and
    content hashes (the driver holds out sft_val by hash, see sft_holdout).

    `chat`: the records are for a base model, written in its tokenizer's chat template; `max_tokens`
    (0: no limit): a longer example is dropped (``longer_than_context``)."""
    tok = _load_tokenizer(tokenizer_path)
    fmt = sft.ChatFormat(tok) if chat else None
    stats = UnitStats()
    np_dtype = np.dtype(dtype).newbyteorder("<")
    out = UnitWriter(Path(work) / "sft", unit.key)
    ids_f, mask_f = out.open(".bin"), out.open(".mask.bin")
    lengths: list[int] = []
    hashes: list[bytes] = []
    where: list[tuple[str | None, int | None, int | None]] = []  # each example's record, for a later drop

    def examples() -> Iterator[list[sft.Piece]]:
        for record in formats.iter_unit_records(unit, data, stats):  # unreadable files are counted there
            try:  # the record boundary: one record's surprise costs that record only
                parts = sft.segments(record, data, stats, fmt)
            except Exception as e:
                stats.drop(f"record_error.{type(e).__name__}")
                continue
            if parts is not None:
                hashes.append(hashlib.blake2b(json.dumps(parts).encode("utf-8"), digest_size=16).digest())
                where.append((stats.file, stats.line, stats.offset))
                yield parts

    kept_hashes = bytearray()
    for i, (ids, mask) in enumerate(sft.tokenize_examples(examples(), tok, _BATCH_CHARS)):
        reason = ("longer_than_context" if max_tokens and len(ids) - 1 > max_tokens
                  # evaluation finds examples by their one <|endoftext|>; a template that writes it mid-way
                  else "end_of_text_inside" if chat and tok.eot_id in ids[:-1] else None)
        if reason:
            stats.file, stats.line, stats.offset = where[i]
            stats.drop(reason)
            continue
        kept_hashes += hashes[i]
        ids_f.write(np.asarray(ids, dtype=np_dtype).tobytes())
        mask_f.write(np.asarray(mask, dtype=np.uint8).tobytes())
        lengths.append(len(ids))
    # Left open: commit() fsyncs and closes every file of the unit.
    np.save(out.open(".len.npy"), np.asarray(lengths, dtype=np.int64))
    np.save(out.open(".hash.npy"), np.frombuffer(bytes(kept_hashes), dtype=np.uint8).reshape(-1, 16))
    return out.commit({
        "examples": len(lengths), "tokens": int(sum(lengths)), "dropped": dict(stats.dropped),
        "repaired": dict(stats.repaired), "locations": stats.locations, "bad_files": stats.bad_files,
        "peak_rss_mb": _peak_rss_mb(),
    })






def summary(manifest: dict[str, Any], out: Path, seconds: float) -> str:
    docs = manifest["documents"]
    dropped = ", ".join(f"{k}={v}" for k, v in docs["dropped"].items()) or "none"
    repaired = ", ".join(f"{k}={v}" for k, v in docs.get("repaired", {}).items()) or "none"
    splits = "; ".join(
        f"{name}: {e['tokens']:,} tokens in {len(e['shards'])} shards" for name, e in manifest["splits"].items()
    )
    curation = ""
    if (out / "curation" / "report.json").is_file():
        from flows.data.curate.report import table

        curation = "\n" + table(json.loads((out / "curation" / "report.json").read_text()), out / "curation")
    return (
        f"preprocess done in {seconds:.1f} s -> {out}{curation}\n"
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
    if "fraction" in manifest.get("val_assignment", {}):
        metrics["val.fraction"] = manifest["val_assignment"]["fraction"]
    if not reused and seconds > 0:
        metrics["tokens_per_s"] = total / seconds
    stats = manifest.get("stats", {})
    if stats.get("worker_peak_rss_mb"):
        metrics["worker_peak_rss_mb"] = stats["worker_peak_rss_mb"]
    metrics.update({f"seconds.{k}": v for k, v in stats.get("seconds", {}).items()})
    curation = manifest.get("curation", {})
    metrics.update({f"curation.pii.{k}": v for k, v in curation.get("pii", {}).items()})
    if "near_dedup" in curation:
        metrics["curation.near_dedup.clusters"] = curation["near_dedup"]["clusters"]
    tracker.log_metrics(metrics)
    tracker.log_artifact(out / "manifest.json")
    for name in ("report.json", "quality_scores.png", "near_dup_clusters.png"):
        if (out / "curation" / name).is_file():
            tracker.log_artifact(out / "curation" / name, "curation")
    tracker.log_artifact(out / "tokenizer.json")
    files = manifest["inputs"]
    tracker.log_input_dataset(
        name=redact_text(", ".join(sources.labels))[:200] or "corpus",
        source=files[0]["path"] if len(files) == 1 else str(Path(files[0]["path"]).parent),
        digest=stable_hash([f["fingerprint"] for f in files], length=32),
        context="preprocess",
        profile={"files": len(files), "documents": docs["kept"], "tokens": total},
    )
