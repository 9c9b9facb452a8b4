"""The preprocess stage's inputs, located and checked before any Ray work.

What it is: :class:`Sources` (the input files with their fingerprints, the given tokenizer, the
verbalised knowledge and the base model the data is for), :func:`locate` (the files and their
fingerprints, cheap on an unchanged corpus: what names the stage's output) and :func:`resolve`
(those files checked -- usable text, parquet fields, fine-tuning formats, the tokenizer --, plus the
Hugging Face export and the knowledge files): every input error surfaces there, so a missing path
or a corpus without usable text fails before any Ray work.

What it is not: resolving one spec to files or fingerprinting one file (flows/data/inputs.py),
nor planning work units (flows/data/units.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

from flows.config import DataConfig
from flows.context import StepContext
from flows.data import inputs, knowledge, knowledge_sources
from flows.data.inputs import InputError, InputFile
from flows.redact import redact_url


@dataclasses.dataclass(frozen=True)
class BaseModel:
    """The pretrained base a dataset is made for (``model.base``): its bundle, whose tokenizer (and
    chat template) the data is written with, and the context length fine-tuning examples must
    fit."""

    bundle: Path
    context_length: int

    @classmethod
    def of(cls, bundle: Path, context_length: int | None) -> BaseModel:
        """The base in `bundle` with the pipeline's context length (None: the model's), capped by
        the model's."""
        own = int(
            json.loads((bundle / "config.json").read_text(encoding="utf-8"))["context_length"]
        )
        return cls(bundle, min(context_length or own, own))


@dataclasses.dataclass
class Sources:
    """The stage's inputs: what :func:`locate` found, completed by :func:`resolve`."""

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

        return files((k.text_train, False), (k.text_val, True)), files(
            (k.sft_train, False), (k.sft_val, True)
        )


def _builtin(spec: str, key: str, workdir: Path) -> str:
    """A builtin corpus spec (``builtin:NAME``) as the folder its files are written to, once."""
    from flows.data import corpus

    make = corpus.BUILTINS.get(spec)
    if make is None:
        raise InputError(
            f"{key}: unknown builtin corpus {spec!r}; known: {', '.join(sorted(corpus.BUILTINS))}"
        )
    return str(make(workdir / "corpus" / spec.removeprefix("builtin:")))


def locate(data: DataConfig, ctx: StepContext) -> Sources:
    """The input files and their fingerprints, without reading more than a changed file's bytes."""
    skipped: Counter = Counter()
    specs = [
        _builtin(s, "data.inputs", ctx.workdir) if s.startswith("builtin:") else s
        for s in data.inputs
    ]
    sft_specs = [
        _builtin(s, "data.sft_inputs", ctx.workdir) if s.startswith("builtin:") else s
        for s in data.sft_inputs
    ]
    text = inputs.describe(
        inputs.resolve_paths(tuple(specs), "data.inputs", skipped), ctx.fingerprints
    )
    sft_files = inputs.describe(
        inputs.resolve_paths(tuple(sft_specs), "data.sft_inputs", skipped), ctx.fingerprints
    )
    ctx.fingerprints.save()
    labels = list(data.inputs) + ([f"hf:{data.hf_dataset}"] if data.hf_dataset else [])
    return Sources(text, sft_files, None, labels or list(data.sft_inputs), skipped)


def resolve(data: DataConfig, ctx: StepContext, cache: Path) -> Sources:
    """The located inputs, checked (usable text, parquet fields, SFT formats), plus the HF export
    and the verbalised knowledge (both written under `cache`) and the given tokenizer: every input
    error surfaces here, before Ray work."""
    sources = locate(data, ctx)
    text, sft_files = sources.text, sources.sft
    if (
        data.knowledge
    ):  # read, checked and verbalised here: a bad source stops the run before Ray work
        sources.knowledge = knowledge.materialize(data, cache / "_knowledge", ctx.fingerprints)
        sources.labels += [knowledge_sources.label(k) for k in data.knowledge]
    know_text, know_sft = sources.knowledge_files()
    if data.hf_dataset:
        text.append(inputs.export_hf_dataset(data, cache / "_hf"))
    for f in sft_files:
        if f.fmt not in ("jsonl", "json"):
            raise InputError(
                f"data.sft_inputs: {redact_url(f.path)} must be .jsonl or .json "
                "(prompt/completion or messages records)"
            )
    if text:
        inputs.check_usable(text, "data.inputs")
        inputs.check_parquet_field(text, data.text_field, "data.inputs")
    elif not sft_files and not data.knowledge:
        raise InputError(
            "data.inputs: no input files (and no data.hf_dataset, data.sft_inputs or "
            "data.knowledge)"
        )
    if sft_files:
        inputs.check_usable(sft_files, "data.sft_inputs")
    for p in data.curate.decontaminate:
        if not Path(p).is_file():
            raise InputError(
                f"data.curate.decontaminate: {p} is not a file (JSONL, JSON or text of an "
                "evaluation set)"
            )
    if data.tokenizer_path:
        from gptcore import Tokenizer

        try:
            sources.tokenizer = Tokenizer.load(data.tokenizer_path)
        except (OSError, ValueError) as e:
            raise InputError(f"data.tokenizer_path={data.tokenizer_path!r}: {e}") from e
    elif not text and not know_text:
        raise InputError(
            "data.tokenizer_path is required when there is no pretraining text to train one on"
        )
    return sources
