"""The evaluate stage: a model bundle and a dataset in, the figures promotion compares and pictures
out.

What it is: :func:`evaluate`, which checks its inputs agree (bundle files, dataset manifest, the
same tokenizer), scores the ``val`` split (loss, perplexity, bits per byte) and the held-out
fine-tuning split ``sft_val``, runs the fixed-prompt generations and their smoke checks, draws the
interpretability artifacts for a validation sample, writes them all to the output directory and
logs them to the tracker.

What it is not: the decision to run or the DONE marker (the pipeline runner owns both), nor the
promotion gate (flows/registry compares two metrics.json). It reads only its own config section.
A split that is missing or empty skips its figures, with the reason in ``metrics.json["notes"]``.

Given the `base` the model was tuned from (the pipeline's ``model.base``), the base is scored on the
same data with the same figures (``metrics.json["base"]``: bits per byte, held-out fine-tuning loss,
task scores), and ``task_answers.jsonl`` holds both models' answers to the held-out prompts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from flows.config import EvaluateConfig
from flows.data.dataset import DataError, read_manifest, read_shard
from flows.evaluate import knowledge
from flows.evaluate.explain import explain_ids
from flows.evaluate.generations import as_text, generate_samples
from flows.evaluate.metrics import has_tokens, sft_val_loss, val_loss
from flows.evaluate.tasks import heldout_pairs, task_figures
from flows.progress import Progress
from flows.tracking import Tracker
from flows.workdir import atomic_write_text

log = logging.getLogger(__name__)

SFT_VAL = "sft_val"


def evaluate(
    cfg: EvaluateConfig,
    bundle: Path,
    dataset: Path,
    out_dir: Path,
    tracker: Tracker | None = None,
    progress: Progress | None = None,
    base: Path | None = None,
) -> Path:
    """Evaluate the model in `bundle` on `dataset`; write metrics.json and the artifacts to
    `out_dir`.

    `base`: the bundle the model was tuned from, scored on the same data (``metrics.json["base"]``).

    Raises ValueError (BundleError or DataError, naming the file) when the bundle or the dataset is
    incomplete or they were made with different tokenizers. Returns `out_dir`.
    """
    from gptcore import load_bundle

    bundle, dataset, out_dir = Path(bundle), Path(dataset), Path(out_dir)
    tracker, progress = tracker or Tracker(), progress or Progress()
    manifest = check_inputs(bundle, dataset)
    progress.note(f"loading {bundle.name} and scoring the validation splits")
    model, tokenizer, _ = load_bundle(bundle, device="cuda" if torch.cuda.is_available() else "cpu")
    T = cfg.context_length or model.config.context_length
    if T > model.config.context_length:
        raise ValueError(
            f"evaluate.context_length={cfg.context_length} exceeds the model's context length "
            f"{model.config.context_length} ({bundle / 'config.json'}); use 0 for the model's"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: dict[str, str] = {}
    results: dict[str, Any] = {"context_length": T}
    results |= _val_figures(cfg, model, tokenizer, dataset, manifest, T, notes)
    results |= _sft_figures(cfg, model, dataset, manifest, T, notes)
    pairs = (
        heldout_pairs(dataset, manifest, tokenizer, cfg.task_max_examples)
        if cfg.task_max_examples and has_tokens(manifest, SFT_VAL)
        else []
    )
    files: list[Path] = []
    if pairs:
        progress.note(f"answering {len(pairs)} held-out prompts")
        figures, tuned_answers = task_figures(
            model, tokenizer, pairs, cfg.task_max_new_tokens, cfg.batch_size
        )
        results |= figures
    base_answers = None
    if base is not None:
        progress.note(f"scoring the base model {base} on the same data")
        results["base"], base_answers = _base_figures(cfg, base, model, dataset, manifest, T, pairs)
    if pairs:
        files.append(_write_answers(out_dir, tokenizer, pairs, tuned_answers, base_answers))

    progress.note(f"generating answers to {len(cfg.prompts)} prompts")
    results["smoke_passed"], generated = _generations(cfg, model, tokenizer, out_dir, notes)
    files += generated
    progress.note("drawing the per-token loss and attention pictures")
    files += _explain_sample(cfg, model, tokenizer, dataset, manifest, T, out_dir, notes)
    if knowledge.has_knowledge(dataset):
        files += _knowledge_figures(cfg, bundle, dataset, out_dir, results, notes, base)
    results["notes"] = notes
    # Written last: whoever finds metrics.json finds every other file complete too.
    atomic_write_text(
        out_dir / "metrics.json", json.dumps(results, indent=2, sort_keys=True) + "\n"
    )
    files.append(out_dir / "metrics.json")

    _track(tracker, results, files)
    _log_summary(results, out_dir)
    return out_dir


def _base_figures(
    cfg: EvaluateConfig,
    base: Path,
    model: Any,
    dataset: Path,
    manifest: dict[str, Any],
    T: int,
    pairs: list,
) -> tuple[dict[str, Any], list | None]:
    """The base model's figures on the same data (``metrics.json["base"]``), and its answers to
    the held-out prompts (None without any)."""
    from gptcore import load_bundle

    check_inputs(base, dataset)
    base_model, base_tok, _ = load_bundle(base, device=next(model.parameters()).device)
    if T > base_model.config.context_length:
        raise ValueError(
            f"the evaluation context {T} exceeds the base model's "
            f"{base_model.config.context_length} ({base / 'config.json'}); set "
            "evaluate.context_length"
        )
    base_notes: dict[str, str] = {}
    figures: dict[str, Any] = {"bundle": str(base)}
    figures |= _val_figures(cfg, base_model, base_tok, dataset, manifest, T, base_notes)
    figures |= _sft_figures(cfg, base_model, dataset, manifest, T, base_notes)
    answers = None
    if pairs:
        task, answers = task_figures(
            base_model, base_tok, pairs, cfg.task_max_new_tokens, cfg.batch_size
        )
        figures |= task
    return figures, answers


def _track(tracker: Tracker, results: dict[str, Any], files: list[Path]) -> None:
    """The figures (the base's under ``base.``) and every file, on the stage's MLflow run."""
    tracker.log_metrics({k: float(v) for k, v in results.items() if isinstance(v, int | float)})
    tracker.log_metrics(
        {
            f"base.{k}": float(v)
            for k, v in results.get("base", {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    )
    if "knowledge" in results:
        tracker.log_metrics(
            knowledge.flat(results["knowledge"], "knowledge")
            | knowledge.flat(results.get("base", {}).get("knowledge", {}), "base.knowledge")
        )
    for path in files:
        tracker.log_artifact(path)


def check_inputs(bundle: Path, dataset: Path) -> dict[str, Any]:
    """The dataset's manifest, once the bundle has its files, the evaluated splits are intact (sizes
    and sha256) and both were made with the same tokenizer; else a ValueError naming the files."""
    from gptcore import Tokenizer
    from gptcore.bundle import FILES, BundleError

    missing = [name for name in FILES if not (bundle / name).is_file()]
    if missing:
        raise BundleError(
            f"{bundle}: not a model bundle, missing {', '.join(missing)} (a bundle has "
            f"{', '.join(FILES)})"
        )
    manifest = read_manifest(dataset, splits=("val", SFT_VAL), verify=True)
    # Compare the tokenizers themselves (canonical JSON), not the files' bytes: equal tokenizers
    # written by different tools are still equal.
    model_tok, data_tok = bundle / "tokenizer.json", dataset / "tokenizer.json"
    if Tokenizer.load(model_tok).sha256() != Tokenizer.load(data_tok).sha256():
        raise DataError(
            f"tokenizer mismatch: the model's {model_tok} differs from the dataset's {data_tok}; "
            "token ids would mean different text. Evaluate on data preprocessed with "
            "data.tokenizer_path set to the bundle"
        )
    return manifest


def _write_answers(
    out_dir: Path, tokenizer: Any, pairs: list[Any], tuned: list[str], base: list[str] | None
) -> Path:
    """task_answers.jsonl: each held-out prompt, its reference, and the model's (and the base's)
    answer."""
    from flows.evaluate.tasks import score_answer

    lines = []
    for i, p in enumerate(pairs):
        row = {
            "prompt": tokenizer.decode(p.prompt_ids),
            "reference": p.reference,
            "answer": tuned[i],
            "score": score_answer(tuned[i], p.reference)["score"],
        }
        if base is not None:
            row |= {
                "base_answer": base[i],
                "base_score": score_answer(base[i], p.reference)["score"],
            }
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(out_dir / "task_answers.jsonl", "\n".join(lines) + "\n")
    return out_dir / "task_answers.jsonl"


def _val_figures(
    cfg: EvaluateConfig,
    model: Any,
    tokenizer: Any,
    dataset: Path,
    manifest: dict[str, Any],
    T: int,
    notes: dict[str, str],
) -> dict[str, Any]:
    if not has_tokens(manifest, "val"):
        notes["val_loss"] = f"split 'val' is missing or empty in {dataset / 'manifest.json'}"
        return {}
    totals = val_loss(model, tokenizer, dataset, manifest, T, cfg.batch_size, cfg.max_tokens)
    return {
        "val_loss": totals.mean_loss,
        "val_perplexity": totals.perplexity,
        "val_bits_per_byte": totals.bits_per_byte,
        "val_tokens": totals.tokens,
        "val_bytes": totals.bytes,
    }


def _sft_figures(
    cfg: EvaluateConfig,
    model: Any,
    dataset: Path,
    manifest: dict[str, Any],
    T: int,
    notes: dict[str, str],
) -> dict[str, Any]:
    if not has_tokens(manifest, SFT_VAL):
        notes["sft_val_loss"] = (
            f"split {SFT_VAL!r} is missing or empty in {dataset / 'manifest.json'}"
        )
        return {}
    totals = sft_val_loss(model, dataset, manifest, T, cfg.batch_size, SFT_VAL)
    if not totals.tokens:
        notes["sft_val_loss"] = f"split {SFT_VAL!r} has no completion token (loss mask 1) to score"
        return {}
    return {"sft_val_loss": totals.mean_loss, "sft_val_tokens": totals.tokens}


def _generations(
    cfg: EvaluateConfig, model: Any, tokenizer: Any, out_dir: Path, notes: dict[str, str]
) -> tuple[bool | None, list[Path]]:
    """generations.json and .txt; whether every generation passed its smoke checks (None: no
    prompts, so not checked -- never a vacuous pass)."""
    records = generate_samples(model, tokenizer, cfg.prompts, cfg.max_new_tokens)
    passed = all(r.passed for r in records) if records else None
    if not records:
        notes["smoke_passed"] = (
            "no prompts configured (evaluate.prompts): nothing was generated or checked"
        )
    record = {"smoke_passed": passed, "generations": [r.to_dict() for r in records]}
    files = [out_dir / "generations.json", out_dir / "generations.txt"]
    atomic_write_text(files[0], json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(files[1], as_text(records))
    return passed, files


def _explain_sample(
    cfg: EvaluateConfig,
    model: Any,
    tokenizer: Any,
    dataset: Path,
    manifest: dict[str, Any],
    T: int,
    out_dir: Path,
    notes: dict[str, str],
) -> list[Path]:
    """The interpretability files for the start of the first validation shard."""
    if not has_tokens(manifest, "val"):
        notes["explain"] = "no validation tokens to draw the loss heatmap and attention maps from"
        return []
    first = next(s for s in manifest["splits"]["val"]["shards"] if s["tokens"] > 1)
    n = min(cfg.sample_tokens, T) + 1  # sample_tokens targets, one window: attention spans it all
    if cfg.sample_tokens > T:
        notes["explain"] = f"sample cut from {cfg.sample_tokens} to the context length, {T} tokens"
    ids = read_shard(dataset, first, manifest["dtype"])[:n].tolist()
    summary = explain_ids(
        model,
        tokenizer,
        ids,
        out_dir,
        cfg.worst_tokens,
        title=f"Per-token loss, first {len(ids) - 1} validation tokens",
    )
    return [Path(f) for f in summary["files"]]


SMOKE_WORDS = {True: "passed", False: "FAILED", None: "not checked"}


def _knowledge_figures(
    cfg: EvaluateConfig,
    bundle: Path,
    dataset: Path,
    out_dir: Path,
    results: dict[str, Any],
    notes: dict[str, str],
    given_base: Path | None = None,
) -> list[Path]:
    """Factual accuracy of the model and, when its bundle names a parent with the same tokenizer,
    of that base (results["knowledge"], results["base"]["knowledge"]); the table of every answer."""
    import csv
    import io

    def score(path: Path, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return knowledge.knowledge_accuracy(
            path, dataset, cfg.knowledge_max_new_tokens, cfg.knowledge_max_questions, name=name
        )

    results["knowledge"], rows = score(bundle, "model")
    base = given_base or _base_bundle(bundle, notes)
    if base is not None:
        figures, base_rows = score(base, "base")
        results["base"] = {**results.get("base", {}), "bundle": str(base), "knowledge": figures}
        rows += base_rows
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=knowledge.TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "knowledge_answers.csv", table.getvalue())
    return [out_dir / "knowledge_answers.csv"]


def _base_bundle(bundle: Path, notes: dict[str, str]) -> Path | None:
    """The bundle the evaluated one was trained from (its metadata's parent), when it is still there
    and speaks the same tokenizer; else None, with the reason in `notes` when there was a parent."""
    from gptcore import Tokenizer

    try:
        parent = (
            json.loads((bundle / "metadata.json").read_text(encoding="utf-8")).get("parent") or {}
        )
    except (OSError, ValueError):
        return None
    path = Path(parent["bundle"]) if isinstance(parent, dict) and parent.get("bundle") else None
    if path is None:
        return None
    if not (path / "model.safetensors").is_file():
        notes["base.knowledge"] = f"the base bundle {path} is gone: no base figures"
        return None
    if (
        Tokenizer.load(path / "tokenizer.json").sha256()
        != Tokenizer.load(bundle / "tokenizer.json").sha256()
    ):
        notes["base.knowledge"] = f"the base bundle {path} has another tokenizer: no base figures"
        return None
    return path


def _log_summary(results: dict[str, Any], out_dir: Path) -> None:
    base = results.get("base", {})

    def shown(k: str, v: float) -> str:
        return f"{k}={base[k]:.4g} -> {v:.4g}" if isinstance(base.get(k), float) else f"{k}={v:.4g}"

    figures = ", ".join(shown(k, v) for k, v in sorted(results.items()) if isinstance(v, float))
    log.info(
        "evaluate -> %s: %s; smoke checks %s",
        out_dir,
        figures or "no loss figures",
        SMOKE_WORDS[results["smoke_passed"]],
    )
    if results.get("knowledge"):
        lines = knowledge.summary_lines(
            results["knowledge"], results.get("base", {}).get("knowledge")
        )
        log.info(
            "evaluate:\n%s\n  every answer: %s", "\n".join(lines), out_dir / "knowledge_answers.csv"
        )
    for key, why in results["notes"].items():
        log.warning("evaluate: %s: %s", key, why)
