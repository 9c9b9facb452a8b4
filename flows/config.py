"""Pipeline configuration: one frozen dataclass per stage, loaded from YAML with dotted overrides.

One path only: dataclass defaults, then the YAML file, then ``--set section.key=value`` overrides.
An unknown key or a value of the wrong type raises :class:`ConfigError` naming the key and the
file. Configs validate; they never act: no file reads beyond the YAML itself, no Ray, no MLflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# The corpus used when no input is given: text extracted from the installed Python's own
# documentation (pydoc help topics and standard-library docstrings), so it exists offline.
BUILTIN_CORPUS = "builtin:python-docs"
# The fine-tuning pairs used when none are given: signatures -> first docstring paragraphs, built
# from the installed Python's standard library (kept apart from BUILTIN_CORPUS's text).
BUILTIN_SFT = "builtin:python-sft"


PRECISIONS = ("fp32", "bf16", "bf16-autocast", "fp16")


class ConfigError(ValueError):
    """A configuration value the user must fix; the message names the key and its source."""


@dataclass(frozen=True)
class NearDedupConfig:
    """Near-duplicate removal: MinHash LSH over word n-grams, clusters by connected components."""

    enabled: bool = True
    """Drop every near-duplicate but the first (in input order) of its cluster (`near_duplicate`)."""
    num_bands: int = 14
    """LSH bands; with rows_per_band they set the similarity threshold, (1/b)**(1/r) ~ 0.72."""
    rows_per_band: int = 8
    """MinHash values per band (num_bands * rows_per_band hashes a document)."""
    ngram: int = 5
    """Words per shingle."""
    seed: int = 0
    """Seed of the MinHash permutations."""
    partitions: int = 16
    """Hash partitions of the band shuffle (one Ray task each); the result does not depend on it."""

    def __post_init__(self) -> None:
        for name in ("num_bands", "rows_per_band", "ngram", "partitions"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        _check(self.num_bands <= 1024, "num_bands", self.num_bands, "<= 1024")
        _check(self.seed >= 0, "seed", self.seed, ">= 0")


@dataclass(frozen=True)
class QualityConfig:
    """Gopher quality and repetition rules and C4's rules; thresholds default to the published ones
    (a threshold of null switches that rule off)."""

    enabled: bool = False
    """Off by default: on the builtin Python-docs corpus the published rules drop 46 % of its
    documents and 28 % of its bytes (short modules, repetitive reference text); on for web text."""
    min_doc_words: int | None = 50
    """Fewest words (not counting pure symbols) a document may have."""
    max_doc_words: int | None = 100_000
    """Most words a document may have."""
    min_avg_word_length: float | None = 3.0
    """Shortest mean word length."""
    max_avg_word_length: float | None = 10.0
    """Longest mean word length."""
    max_symbol_word_ratio: float | None = 0.1
    """'#' and '...' per word, each."""
    max_bullet_lines_ratio: float | None = 0.9
    """Most lines that may start with a bullet."""
    max_ellipsis_lines_ratio: float | None = 0.3
    """Most lines that may end with an ellipsis."""
    min_alpha_words_ratio: float | None = 0.8
    """Least share of words with a letter in them."""
    min_stop_words: int | None = 2
    """Fewest distinct stop words (the, be, to, of, and, that, have, with)."""
    repetition: bool = True
    """Gopher's repetition rules (duplicate lines/paragraphs, top and duplicate n-gram fractions)."""
    dup_line_frac: float | None = 0.30
    """Most lines that may repeat an earlier line."""
    dup_para_frac: float | None = 0.30
    """Most paragraphs that may repeat an earlier paragraph."""
    dup_line_char_frac: float | None = 0.20
    """Most characters in repeated lines."""
    dup_para_char_frac: float | None = 0.20
    """Most characters in repeated paragraphs."""
    top_ngram_fracs: tuple[float, ...] = (0.20, 0.18, 0.16)
    """Top 2-, 3- and 4-gram character fractions."""
    dup_ngram_fracs: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)
    """Duplicate 5- to 10-gram character fractions."""
    c4: bool = True
    """C4's rules: lorem ipsum, javascript and cookie/terms lines, and the switches below."""
    c4_curly_bracket: bool = False
    """Drop documents with a '{' (C4 does; code and docs have them)."""
    c4_terminal_punct: bool = False
    """Remove lines that do not end in terminal punctuation (C4 does; chat and lists do not)."""
    c4_min_words_per_line: int = 0
    """Remove lines with fewer words (C4: 3); 0 keeps them."""
    c4_min_sentences: int = 0
    """Drop documents left with fewer sentences (C4: 5); 0 disables."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or value is None:
                continue
            for v in value if isinstance(value, tuple) else (value,):
                _check(math.isfinite(v) and v >= 0, f.name, value, "a finite number >= 0 (null switches it off)")


@dataclass(frozen=True)
class CurateConfig:
    """Curation of pretraining text: near-duplicates, quality, language, PII, decontamination."""

    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    languages: tuple[str, ...] = ()
    """Keep documents in these languages (ISO 639-1, e.g. [en]); empty keeps all."""
    language_min_score: float = 0.5
    """Least share of a document's text in its language (CLD2's score) for it to count."""
    pii: Literal["redact", "drop", "off"] = "redact"
    """E-mail, phone, IP, payment card and IBAN: replaced by placeholders, the document dropped, or left."""
    decontaminate: tuple[str, ...] = ()
    """Evaluation files (.jsonl/.json/text); training documents sharing a word n-gram with them are dropped."""
    decontaminate_ngram: int = 13
    """Words per n-gram of the decontamination check."""
    samples_per_reason: int = 3
    """Dropped documents shown per reason in the curation report."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.language_min_score <= 1.0, "language_min_score", self.language_min_score, "in [0, 1]")
        _check(self.decontaminate_ngram >= 1, "decontaminate_ngram", self.decontaminate_ngram, ">= 1")
        _check(self.samples_per_reason >= 0, "samples_per_reason", self.samples_per_reason, ">= 0")
        for code in self.languages:
            _check(len(code) in (2, 3) and code.isalpha() and code.islower(), "languages", code,
                   "ISO 639-1 codes such as en, de, fr")


@dataclass(frozen=True)
class KnowledgeTemplate:
    """How one row of a knowledge source is put into words; `{field}` names a column (or, for RDF,
    `{subject}` and `{object}`)."""

    text: str = ""
    """A statement: pretraining text (empty: none)."""
    ask: tuple[str, ...] = ()
    """Questions about the row: each becomes a fine-tuning prompt, except the last, which is held out
    from training (asked in evaluation only) when there are two or more."""
    answer: str = ""
    """The fine-tuning completion and the expected answer (required with `ask`)."""


@dataclass(frozen=True)
class KnowledgeSource:
    """A database table, knowledge graph or row file verbalised into training data (flows/data/knowledge.py)."""

    source: str = ""
    """A SQLAlchemy URL (sqlite:///path.db, postgresql://...), an RDF file (.nt, .ttl, .rdf/.xml/.owl)
    or a row file (.csv, .jsonl)."""
    query: str = ""
    """For a database: one SELECT statement; its columns are the template fields."""
    predicate: str = ""
    """For RDF: the predicate IRI; one row per (subject, object) of it."""
    templates: tuple[KnowledgeTemplate, ...] = ()
    """How each row is put into words."""
    holdout_fraction: float = 0.1
    """Share of the rows (chosen by a stable hash of the row) never trained on: the held-out facts."""

    def __post_init__(self) -> None:  # what a source needs (a source, templates) is checked where it is read
        _check(0.0 <= self.holdout_fraction < 1.0, "holdout_fraction", self.holdout_fraction, "in [0, 1)")


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing: raw text in, a versioned dataset directory of token shards out."""

    inputs: tuple[str, ...] = (BUILTIN_CORPUS,)
    """Files, folders, globs or fsspec URLs of .txt/.md/.jsonl/.json/.parquet (optionally .gz/.zst)."""
    sft_inputs: tuple[str, ...] = ()
    """Fine-tuning JSONL files: {"prompt", "completion"} or {"messages": [{"role", "content"}]}."""
    hf_dataset: str | None = None
    """A Hugging Face `datasets` source: a hub name, or a local `save_to_disk` directory."""
    hf_config: str | None = None
    """The dataset's configuration name, if it has several."""
    hf_split: str = "train"
    """The split to read from the `datasets` source."""
    hf_data_files: tuple[str, ...] = ()
    """Local data files for a `datasets` builder (e.g. hf_dataset: json)."""
    text_field: str = "text"
    """The field holding the document text in JSON, JSONL, parquet and `datasets` records."""
    min_chars: int = 32
    """Documents shorter than this after cleaning are dropped (counted as `too_short`)."""
    max_doc_chars: int = 1_000_000
    """Longer documents are split into pieces of at most this many characters."""
    vocab_size: int = 4096
    """Size of the byte-level BPE vocabulary to train (special tokens included)."""
    min_frequency: int = 2
    """A merge must occur at least this often in the sample to be learned."""
    tokenizer_sample_chars: int = 20_000_000
    """Characters of cleaned text, sampled deterministically, used to train the tokenizer."""
    tokenizer_path: str | None = None
    """Use this tokenizer (tokenizer.json, a directory, or GPT-2 vocab.json+merges.txt) instead of training one."""
    val_fraction: float = 0.01
    """Fraction of the tokens, chosen by content hash (whole documents, or pieces of long ones),
    that go to the validation split (at most 0.5); with val_min_tokens=0 too, there is no val split."""
    val_min_tokens: int = 20_000
    """Floor on the validation split's size in tokens; a corpus that cannot give it and a train split
    at least as large is an error (before any Ray work when the input sizes already show it)."""
    val_piece_chars: int = 4096
    """When documents are too few or too long to assign whole, they are cut into pieces of at most
    this many characters (at a line break or space), each assigned by its hash."""
    sft_val_fraction: float = 0.05
    """Fraction of fine-tuning examples (rounded up), chosen by content hash, held out as the
    `sft_val` split; at least one of two or more, never more than half."""
    sft_val_min_examples: int = 16
    """Floor on the held-out fine-tuning examples (when there are at least twice as many)."""
    shard_tokens: int = 16_777_216
    """Upper bound on tokens per shard file."""
    work_unit_bytes: int = 32 * 1024 * 1024
    """Input bytes per Ray task; bounds each worker's memory independently of corpus size."""
    max_line_bytes: int = 16 * 1024 * 1024
    """Longest JSONL line, JSON array element or single-value .json file read; a longer one is skipped
    without holding it in memory and counted (`line_too_long`, `record_too_long`)."""
    num_workers: int = 0
    """Ray tasks that run at once; 0 means one per CPU of the Ray cluster."""
    seed: int = 0
    """Seed for the tokenizer sample."""
    min_work_units: int = 16
    """Split the corpus into at least this many work units (when its files allow), so that workers
    share it evenly; the plan depends on the inputs only, never on the worker count."""
    unicode_normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normalisation form applied to every document while cleaning."""
    drop_control_chars: bool = True
    """Remove control characters (all but newline and tab) while cleaning."""
    dedup: bool = True
    """Drop exact duplicate documents (same cleaned content), keeping the first in input order."""
    curate: CurateConfig = field(default_factory=CurateConfig)
    """Curation filters applied to pretraining text (flows/data/curate/)."""
    knowledge: tuple[KnowledgeSource, ...] = ()
    """Databases, knowledge graphs and row files whose rows become statements and question/answer
    pairs (their content, not only their names, enters the dataset's identity)."""
    max_drop_fraction: float = 0.05
    """Most of the input records (documents; fine-tuning examples apart) that may be dropped because
    they could not be read as written -- unreadable files, truncated archives, malformed JSON, records
    without the text field -- before preprocessing fails naming the worst files (instead of training
    on partial data). The filters that drop by design (empty, too short, binary, duplicates,
    curation) do not count. 1 accepts any loss."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.val_fraction < 1.0, "val_fraction", self.val_fraction, "in [0, 1)")
        _check(0.0 <= self.sft_val_fraction < 1.0, "sft_val_fraction", self.sft_val_fraction, "in [0, 1)")
        for name in ("val_min_tokens", "sft_val_min_examples"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        _check(self.val_piece_chars >= 64, "val_piece_chars", self.val_piece_chars, ">= 64")
        _check(self.vocab_size >= 260, "vocab_size", self.vocab_size, ">= 260 (256 bytes + specials)")
        _check(self.shard_tokens > 0, "shard_tokens", self.shard_tokens, "> 0")
        _check(self.work_unit_bytes > 0, "work_unit_bytes", self.work_unit_bytes, "> 0")
        _check(self.min_chars >= 0, "min_chars", self.min_chars, ">= 0")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, ">= 0")
        _check(self.min_work_units >= 1, "min_work_units", self.min_work_units, ">= 1")
        _check(self.max_doc_chars >= 1, "max_doc_chars", self.max_doc_chars, ">= 1")
        _check(self.min_frequency >= 0, "min_frequency", self.min_frequency, ">= 0")
        _check(self.tokenizer_sample_chars >= 1, "tokenizer_sample_chars", self.tokenizer_sample_chars, ">= 1")
        _check(self.seed >= 0, "seed", self.seed, ">= 0")
        _check(self.max_line_bytes >= 1, "max_line_bytes", self.max_line_bytes, ">= 1")
        _check(0.0 <= self.max_drop_fraction <= 1.0, "max_drop_fraction", self.max_drop_fraction, "in [0, 1]")


# DataConfig keys that name the inputs rather than shape the dataset: a dataset's identity holds
# the inputs' content fingerprints instead (the worker count never changes the output, and
# max_drop_fraction only decides whether a build is accepted: raising it after a failure resumes it).
DATA_INPUT_KEYS = ("inputs", "sft_inputs", "hf_dataset", "hf_config", "hf_split", "hf_data_files",
                   "tokenizer_path", "num_workers", "max_drop_fraction")


@dataclass(frozen=True)
class ModelConfig:
    """Which GPT to build: a pretrained base, or a gptcore preset plus a few overrides (vocab_size comes
    from the tokenizer)."""

    base: str = ""
    """A pretrained base model to start from: what `gptflow import` takes (builtin:smollm2-135m-instruct,
    a Hugging Face directory, a .gguf file), a bundle directory or models:/NAME@ALIAS. The pipeline then
    imports it (step `import`), tokenizes with its tokenizer and chat template, and pretraining continues
    from it. Empty: a GPT from scratch (`preset`) with a BPE vocabulary trained on the corpus."""
    preset: str = "tiny"
    """A name in gptcore.PRESETS: tiny, small, gpt2-124m, gpt2-350m, gpt2-774m, gpt2-1.5b (GPT-2);
    tiny-llama, smollm2-135m, smollm2-360m, llama-3.2-1b (the Llama family)."""
    context_length: int | None = None
    """Override the preset's context length; with `base` (or an init model): the training windows,
    capped by the model's own context length."""
    dropout: float = 0.0
    """Dropout probability in attention and MLP outputs."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""

    def __post_init__(self) -> None:
        _check(self.context_length is None or self.context_length >= 1, "context_length", self.context_length,
               ">= 1 (or empty for the preset's)")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)")


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (gptcore/lora.py): train r x (in + out) numbers per targeted matrix instead of
    the matrix; they are merged into the weights when the bundle is written. Off when r is 0."""

    r: int = 0
    """Rank of the adapters; 0 trains every weight (full fine-tuning)."""
    alpha: float = 16.0
    """Scale of the update: alpha / r times B A."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    targets: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    """Suffixes of the linear layers adapted: attention's fused q/k/v and output, the MLP's in and out."""

    def __post_init__(self) -> None:
        _check(self.r >= 0, "r", self.r, ">= 0 (0: off)")
        _check(math.isfinite(self.alpha) and self.alpha > 0, "alpha", self.alpha, "> 0")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)")
        _check(bool(self.targets), "targets", self.targets, "at least one layer name suffix")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: pretraining from scratch, or fine-tuning from a model (same loop)."""

    data: str = ""
    """Dataset directory from preprocessing; empty means the pipeline's own preprocess output."""
    init: str | None = None
    """Start from: a bundle directory, models:/NAME@ALIAS or models:/NAME/VERSION, or what `gptflow import` takes
    (builtin:NAME, a Hugging Face directory, a .gguf file), imported once into <workdir>/import/<hash>/."""
    steps: int = 200
    """Optimizer steps; 0 skips the step (pretraining from a model.base: fine-tune the base itself)."""
    micro_batch_size: int = 8
    """Sequences per worker per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: int | None = None
    """If set, must equal micro_batch_size * grad_accum * num_workers (checked before any worker starts)."""
    num_workers: int = 1
    """Ray Train workers (one process each)."""
    use_gpu: bool = False
    """One GPU per worker (nccl); CPU workers use gloo."""
    cpus_per_worker: int = 1
    """CPUs reserved per worker (also its torch thread count on CPU)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    precision: Literal["fp32", "bf16", "bf16-autocast", "fp16"] = "fp32"
    """Training precision: fp32; bf16 or fp16 weights (DeepSpeed keeps fp32 master weights); or
    bf16-autocast: fp32 weights, gradients and all-reduce, matmuls in bf16 under torch.autocast."""
    offload_optimizer: bool = False
    """ZeRO optimizer state offload to CPU (stages 1-3)."""
    compile: bool = False
    """torch.compile the model through DeepSpeed (inductor): faster steps after a one-off compile (~20 s)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor, as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Gradient norm clipping; 0 disables it."""
    eval_every: int = 50
    """Validation loss, perplexity and samples every this many steps (and at the end)."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation."""
    checkpoint_every: int = 50
    """Resume checkpoint every this many steps (and at the end); also the most steps a restart after a
    lost worker repeats."""
    keep_checkpoints: int = 2
    """Resume checkpoints kept."""
    max_failures: int = 3
    """Restarts of the worker group from the latest checkpoint after a lost or failed worker (killed,
    out of memory, node gone), per fit, before the run fails; 0 fails on the first. A restarted run
    ends with the weights an uninterrupted one would have."""
    loss_spike_factor: float = 0.0
    """Skip an update whose loss exceeds this multiple of the running mean; 0 disables it."""
    max_skipped_updates: int = 5
    """Consecutive skipped updates (NaN/inf or spikes) after which the run stops with an error."""
    peak_flops_per_device: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 picks a default for the device kind."""
    sample_prompts: tuple[str, ...] = ("The", "def ")
    """Prompts whose greedy continuations are logged at each evaluation."""
    run_name: str | None = None
    """Ray Train run name; reusing one resumes that run from its last checkpoint."""
    seed: int = 0
    """Seed for initialisation and batch order."""
    storage_path: str = ""
    """Where resume checkpoints go (shared by all nodes: a path or s3://...); empty = <workdir>/ray_results."""
    sample_tokens: int = 32
    """New tokens generated per sample prompt at each evaluation."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Low-rank adapters instead of training every weight (needs an init model; ZeRO 0-2)."""

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "zero_stage", self.zero_stage, "one of 0, 1, 2, 3")
        # ZeRO-3 partitions every parameter, the frozen ones too, and the merge at export would need
        # them gathered beside the adapters; not supported (yet).
        _check(not (self.lora.r and self.zero_stage == 3), "zero_stage", self.zero_stage,
               "0, 1 or 2 with lora (ZeRO-3 with LoRA adapters is not supported)")
        _check(self.precision in PRECISIONS, "precision", self.precision, ", ".join(PRECISIONS))
        _check_finite(self)
        _check(self.steps >= 0, "steps", self.steps, ">= 0 (0: skip the step)")
        for name in ("micro_batch_size", "grad_accum", "num_workers", "cpus_per_worker",
                     "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "max_skipped_updates"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        for name in ("warmup_steps", "max_failures", "sample_tokens", "weight_decay", "grad_clip", "loss_spike_factor",
                     "peak_flops_per_device", "seed"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        for name in ("beta1", "beta2"):
            _check(0.0 <= getattr(self, name) < 1.0, name, getattr(self, name), "in [0, 1)")
        _check(self.lr > 0, "lr", self.lr, "> 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        expected = self.micro_batch_size * self.grad_accum * self.num_workers
        _check(
            self.global_batch_size in (None, expected), "global_batch_size", self.global_batch_size,
            f"micro_batch_size * grad_accum * num_workers = {expected}",
        )


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """Knowledge distillation: a smaller student GPT trained on the same shards with the training loop's
    loss replaced by ``alpha * CE(labels) + (1 - alpha) * temperature^2 * KL(teacher_T || student_T)``,
    the teacher run in inference mode beside the student on each worker. Every training key applies
    to the student's run; ``init`` (optional) starts the student from a model instead of from scratch."""

    enabled: bool = False
    """Run the distill step (and evaluate, register and promote the student) in `gptflow run`."""
    teacher: str = ""
    """The teacher: a bundle directory, models:/NAME@ALIAS or models:/NAME/VERSION, or what `gptflow import`
    takes (imported once); empty = the pipeline's own final model (fine-tuned, else pretrained)."""
    student_preset: str = "tiny"
    """The student's architecture (gptcore preset); its vocabulary is the teacher's and the data's."""
    context_length: int | None = None
    """The student's context (training windows); empty = the teacher's. At most the teacher's."""
    dropout: float = 0.0
    """The student's dropout."""
    activation_checkpointing: bool = False
    """Recompute the student's block activations in backward (less memory, ~30% more compute)."""
    alpha: float = 0.5
    """Weight of the labels' cross-entropy; 1 - alpha weighs the teacher's soft targets (0: soft targets only)."""
    temperature: float = 1.0
    """Softmax temperature of both distributions in the KL term (> 0; higher: softer targets, more weight on
    the teacher's ranking of unlikely tokens). Measured here (README): 2 made short runs worse than 1."""
    split: Literal["train", "sft"] = "train"
    """Which shards the student learns on: the pretraining text, or the fine-tuning examples (completion
    tokens only, like fine-tuning); validation uses the matching held-out split."""
    registry_name: str = ""
    """The student's registered model name; empty = "<registry.name>-student"."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "in [0, 1]")
        _check(self.temperature > 0, "temperature", self.temperature, "> 0")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)")
        _check(self.context_length is None or self.context_length >= 1, "context_length", self.context_length,
               ">= 1 (or empty for the teacher's)")

    def student_model(self) -> ModelConfig:
        """The student's architecture as a model section (the context is settled against the teacher)."""
        return ModelConfig(preset=self.student_preset, context_length=self.context_length, dropout=self.dropout,
                           activation_checkpointing=self.activation_checkpointing)


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation of a model bundle on a dataset: the figures promotion compares, plus pictures."""

    bundle: str = ""
    """Model bundle directory to evaluate; empty means the pipeline's final model (finetune, else pretrain)."""
    data: str = ""
    """Dataset directory; empty means the pipeline's own preprocess output."""
    max_tokens: int = 0
    """Validation tokens to score (0: the whole val split); fixed windows in order, so reproducible."""
    batch_size: int = 8
    """Windows per forward pass."""
    context_length: int = 0
    """Window length in tokens (0: the model's context length)."""
    prompts: tuple[str, ...] = ("The ", "def ", "Return the ")
    """Prompts whose greedy continuations are recorded and smoke-checked."""
    max_new_tokens: int = 48
    """New tokens per prompt."""
    sample_tokens: int = 256
    """Tokens of the validation sample drawn as a per-token loss heatmap and attention maps."""
    worst_tokens: int = 25
    """Rows in the table of the tokens the model predicts worst."""
    knowledge_max_new_tokens: int = 16
    """New tokens per knowledge question (greedy) when the dataset has knowledge sources."""
    knowledge_max_questions: int = 0
    """Questions asked per group (0: all), the first by a stable hash, when the dataset has knowledge."""
    task_max_examples: int = 32
    """Held-out fine-tuning examples answered (greedy) and scored against their references (0: none)."""
    task_max_new_tokens: int = 96
    """Most new tokens per held-out answer (fewer when the references are shorter)."""

    def __post_init__(self) -> None:
        for name in ("max_tokens", "context_length"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        _check(self.knowledge_max_questions >= 0, "knowledge_max_questions", self.knowledge_max_questions, ">= 0")
        _check(self.task_max_examples >= 0, "task_max_examples", self.task_max_examples, ">= 0")
        for name in ("batch_size", "max_new_tokens", "sample_tokens", "worst_tokens", "knowledge_max_new_tokens",
                     "task_max_new_tokens"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")


@dataclass(frozen=True)
class RegistryConfig:
    """The MLflow model registry: the register and promote steps after evaluate."""

    enabled: bool = True
    """Register the final model and gate its promotion (needs tracking)."""
    name: str = "gpt"
    """Registered model name."""
    metric: Literal["bits_per_byte", "perplexity", "sft_val_loss"] = "bits_per_byte"
    """What the gate compares: bits per byte (comparable across tokenizers), perplexity, or the loss on
    the held-out fine-tuning answers (sft_val_loss: for a tuned model, the figure the tuning is for;
    a champion with another tokenizer has none, and is replaced)."""
    margin: float = 0.01
    """A challenger must beat the champion by this fraction of the champion's figure."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.margin < 1.0, "margin", self.margin, "in [0, 1)")
        _check(bool(self.name) and "/" not in self.name and "@" not in self.name, "name", self.name,
               "a non-empty name without '/' or '@'")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: where runs go. The MLFLOW_TRACKING_URI environment variable wins over `uri`."""

    enabled: bool = True
    """Turn tracking off (tests of a stage alone)."""
    uri: str | None = None
    """Tracking URI; default sqlite:///<workdir>/mlflow.db with artifacts under <workdir>/mlartifacts."""
    experiment: str = "gptflow"
    """MLflow experiment name."""


@dataclass(frozen=True)
class ClusterConfig:
    """The Ray cluster to use; RAY_ADDRESS in the environment wins over `address`."""

    address: str | None = None
    """Ray address to join ("auto": the latest `ray start` on this machine; "host:6379"; "ray://host:10001");
    empty starts a fresh local Ray instance, never joining another by accident. An address whose GCS does
    not answer within seconds is an error."""
    num_cpus: int | None = None
    """CPUs for a local Ray instance (default: all)."""
    allow_no_auth: bool = False
    """Accept a Ray cluster that does not require token authentication (anyone who can reach it can run
    code on it). By default gptflow checks, once connected, that the cluster refuses a request without
    the token, and stops otherwise."""

    def __post_init__(self) -> None:
        _check(self.num_cpus is None or self.num_cpus >= 1, "num_cpus", self.num_cpus, ">= 1 (or empty for all)")


@dataclass(frozen=True)
class ScheduleConfig:
    """`gptflow schedule`: how a trigger waits for its inputs and for its Ray job (when it fires and
    what it runs are the command's --cron, --on-new-data and --address)."""

    settle_s: float = 60.0
    """Seconds the local input files must have kept their size and mtime before a data-triggered run
    (--on-new-data) fingerprints them: a file still being written defers the trigger to the next fire
    time (`deferred: inputs still changing: FILE`). 0 turns the wait off."""
    job_timeout_s: float = 6 * 3600.0
    """Longest wait for a submitted run's Ray job (--address), from its submission; then the job is
    stopped and the trigger recorded as `failed (timeout)`."""

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.settle_s >= 0, "settle_s", self.settle_s, ">= 0 (0: no wait)")
        _check(self.job_timeout_s > 0, "job_timeout_s", self.job_timeout_s, "> 0")


@dataclass(frozen=True)
class ServeConfig:
    """Ray Serve: the OpenAI-compatible HTTP server (`gptflow serve`) and the optional deploy step."""

    model: str | None = None
    """What to serve: NAME@ALIAS in the registry (default: <registry.name>@champion), followed as the
    alias moves; or a bundle directory, served as it is."""
    served_name: str | None = None
    """The model name clients send and /v1/models lists (default: the registered model's name)."""
    host: str = "127.0.0.1"
    """Interface to bind; 127.0.0.1 unless the server is meant to be reached from elsewhere."""
    port: int = 8000
    api_key_env: str = "GPTFLOW_API_KEY"
    """Environment variable holding the API key; when it is set, requests need `Authorization: Bearer <key>`."""
    allow_no_auth: bool = False
    """Serve on a non-loopback host without an API key (refused otherwise: auth fails closed)."""
    max_prompts: int = 32
    """Prompts in one completions request (a list prompt); past it, 400."""
    stall_s: float = 60.0
    """/healthz fails (503) when the decode loop has work but has not finished a step for this long."""
    max_batch_size: int = 16
    """Sequences decoded together in a replica (continuous batching); 1 turns batching off."""
    max_batch_tokens: int | None = None
    """Token budget of a replica's batch: prompt + max_tokens summed over running sequences (default:
    max_batch_size x context length)."""
    max_queue: int = 64
    """Requests waiting for a batch slot per replica; past it, 429 with Retry-After."""
    max_prompt_tokens: int | None = None
    """Longest prompt accepted (default: the context length minus one)."""
    max_tokens_limit: int = 1024
    """Cap on a request's max_tokens."""
    max_n: int = 8
    """Cap on a request's n (completions per prompt)."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (413 past it)."""
    request_timeout_s: float = 120.0
    """A request still generating after this long ends with a 504 (streams: an error event)."""
    poll_s: float = 10.0
    """How often a replica checks the registry alias it follows (0: never)."""
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0
    """Autoscaling target per replica (used when max_replicas > min_replicas)."""
    num_cpus: float = 1.0
    """CPUs per replica."""
    num_gpus: float = 0.0
    """GPUs per replica (the model runs on cuda when > 0)."""
    deploy: bool = False
    """Run the serve step after promote: (re)deploy on the configured Ray cluster."""
    knowledge: bool = False
    """Ground chat answers on the model's knowledge sources: BM25 retrieval over the verbalised
    statements of its dataset, the facts put in the prompt, the rows used named in the response."""
    knowledge_top_k: int = 3
    """Facts retrieved per question when `knowledge` is on."""
    access_log: bool = True
    """Ray Serve's access log: one line per request in the replicas' logs."""

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(1 <= self.port <= 65535, "port", self.port, "in [1, 65535]")
        for key in ("max_batch_size", "max_queue", "max_tokens_limit", "max_n", "max_body_bytes", "min_replicas",
                    "max_prompts", "knowledge_top_k"):
            _check(getattr(self, key) >= 1, key, getattr(self, key), ">= 1")
        _check(self.max_replicas >= self.min_replicas, "max_replicas", self.max_replicas, ">= min_replicas")
        for key in ("max_batch_tokens", "max_prompt_tokens"):
            value = getattr(self, key)
            _check(value is None or value >= 1, key, value, ">= 1 (or empty for the default)")
        for key in ("request_timeout_s", "target_ongoing_requests", "num_cpus", "stall_s"):
            _check(getattr(self, key) > 0, key, getattr(self, key), "> 0")
        for key in ("poll_s", "num_gpus"):
            _check(getattr(self, key) >= 0, key, getattr(self, key), ">= 0")
        _check(bool(self.api_key_env), "api_key_env", self.api_key_env, "an environment variable name")


# The pipeline's defaults (the embedded configs/local.yaml): pretrain the small preset on the builtin
# corpus, then fine-tune it on the builtin pairs, on a 2-core laptop in minutes. bf16 autocast runs
# matmuls ~4x faster than fp32 on CPUs with AVX-512 BF16 (1.3x for a whole step of this small model,
# whose time goes to per-op overhead); one worker per core.
def _data_defaults() -> DataConfig:
    return DataConfig(sft_inputs=(BUILTIN_SFT,))


def _model_defaults() -> ModelConfig:
    return ModelConfig(preset="small")


def _pretrain_defaults() -> TrainConfig:
    return TrainConfig(steps=300, micro_batch_size=32, num_workers=2, precision="bf16-autocast", lr=3e-3,
                       warmup_steps=20, eval_every=100, checkpoint_every=100)


def _finetune_defaults() -> TrainConfig:
    return TrainConfig(steps=100, micro_batch_size=32, num_workers=2, precision="bf16-autocast", lr=1e-3,
                       warmup_steps=10, weight_decay=0.0, eval_every=50, checkpoint_every=50)


def _distill_defaults() -> DistillConfig:
    return DistillConfig(steps=300, micro_batch_size=32, num_workers=2, precision="bf16-autocast", lr=3e-3,
                         warmup_steps=20, eval_every=100, checkpoint_every=100)


def _evaluate_defaults() -> EvaluateConfig:
    # Prompts in the fine-tuning format (see flows/data/corpus.py), for functions no stdlib has.
    return EvaluateConfig(prompts=(
        '# textutils.count_words\ndef count_words(text, sep=None):\n    """',
        '# shapes.Circle.area\ndef area(self):\n    """',
        '# netutils.parse_headers\ndef parse_headers(lines):\n    """',
        "The ",
    ))


@dataclass(frozen=True)
class PipelineConfig:
    """The whole pipeline: a section per stage, plus where outputs go."""

    workdir: str = "work"
    """Root of every stage's output (<workdir>/<stage>/<hash>/); shared storage on clusters."""
    data: DataConfig = field(default_factory=_data_defaults)
    model: ModelConfig = field(default_factory=_model_defaults)
    pretrain: TrainConfig = field(default_factory=_pretrain_defaults)
    finetune: TrainConfig = field(default_factory=_finetune_defaults)
    distill: DistillConfig = field(default_factory=_distill_defaults)
    evaluate: EvaluateConfig = field(default_factory=_evaluate_defaults)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


def _check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: must be {valid}")


def _check_finite(cfg: Any) -> None:
    """No float setting may be NaN or infinite (YAML reads .nan and .inf; `x >= 0` lets inf through)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        _check(not isinstance(value, float) or math.isfinite(value), f.name, value, "a finite number")


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> PipelineConfig:
    """Defaults, then the YAML file at `path` (if any), then `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(raw, key.strip().split("."), _override_value(value), item)
    return build(PipelineConfig, raw, source)


def _override_value(text: str) -> Any:
    """A --set value as YAML (numbers, booleans, lists); text YAML cannot parse (`*.txt`) stays a string."""
    if not text.strip():
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict[str, Any], keys: list[str], value: Any, item: str) -> None:
    node = raw
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:  # absent, or an empty section in the YAML (`finetune:`)
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def build(cls: type, raw: Any, source: str, prefix: str = "", base: Any = None) -> Any:
    """Make dataclass `cls` from a mapping, checking every key and type; errors name key and source.

    Keys the mapping leaves out keep their value in `base` (the enclosing config's default for this
    section, e.g. the pipeline's pretraining defaults), else the dataclass default.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{source}: unknown key {key!r}; valid keys here: {', '.join(sorted(fields))}")
    defaults = {f.name: f.default_factory() for f in dataclasses.fields(cls)
                if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(hints[f.name])}
    kwargs = {name: _coerce(hints[name], value, source, f"{prefix}{name}", defaults.get(name))
              for name, value in raw.items()}
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {prefix}{e}") from None


def _coerce(tp: Any, value: Any, source: str, key: str, base: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):  # an empty section (`finetune:`) means all defaults
        return build(tp, value if value is not None else {}, source, key + ".", base)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {key}: bad value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(repr, typing.get_args(tp)))
            raise ConfigError(f"{source}: {key}={value!r} is not one of {choices}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {tp}")


# --------------------------------------------------------------------------- hashing


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": value}, for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def stable_hash(*parts: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of `parts` (dataclasses become dicts), truncated."""
    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"cannot hash {type(o).__name__}")

    blob = json.dumps(parts, sort_keys=True, default=default, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
