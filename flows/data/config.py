"""The data section: preprocessing (inputs, cleaning, tokenizer, splits, shards), curation and
knowledge sources. Read by flows/data/; composed into the pipeline's config by flows/config.py."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from flows.configlib import check, unhashed

# The corpus used when no input is given: text extracted from the installed Python's own
# documentation (pydoc help topics and standard-library docstrings), so it exists offline.
BUILTIN_CORPUS = "builtin:python-docs"
# The fine-tuning pairs used when none are given: signatures -> first docstring paragraphs, built
# from the installed Python's standard library (kept apart from BUILTIN_CORPUS's text).
BUILTIN_SFT = "builtin:python-sft"

# The inputs are named here; what enters the dataset's identity is their content (the preprocess
# step's fingerprint, flows/data/stage.py).
_BY_CONTENT = "an input: its content enters the hash (the preprocess fingerprint)"


@dataclass(frozen=True)
class NearDedupConfig:
    """Near-duplicate removal: MinHash LSH over word n-grams, clusters by connected components."""

    enabled: bool = True
    """Drop every near-duplicate but the first (in input order) of its cluster
    (`near_duplicate`)."""
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
            check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        check(self.num_bands <= 1024, "num_bands", self.num_bands, "<= 1024")
        check(self.seed >= 0, "seed", self.seed, ">= 0")


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
    """Gopher's repetition rules (duplicate lines/paragraphs, top and duplicate n-gram
    fractions)."""
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
                check(
                    math.isfinite(v) and v >= 0,
                    f.name,
                    value,
                    "a finite number >= 0 (null switches it off)",
                )


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
    """E-mail, phone, IP, payment card and IBAN: replaced by placeholders, the document dropped, or
    left."""
    decontaminate: tuple[str, ...] = ()
    """Evaluation files (.jsonl/.json/text); training documents sharing a word n-gram with them are
    dropped."""
    decontaminate_ngram: int = 13
    """Words per n-gram of the decontamination check."""
    samples_per_reason: int = 3
    """Dropped documents shown per reason in the curation report."""

    def __post_init__(self) -> None:
        check(
            0.0 <= self.language_min_score <= 1.0,
            "language_min_score",
            self.language_min_score,
            "in [0, 1]",
        )
        check(
            self.decontaminate_ngram >= 1, "decontaminate_ngram", self.decontaminate_ngram, ">= 1"
        )
        check(self.samples_per_reason >= 0, "samples_per_reason", self.samples_per_reason, ">= 0")
        for code in self.languages:
            check(
                len(code) in (2, 3) and code.isalpha() and code.islower(),
                "languages",
                code,
                "ISO 639-1 codes such as en, de, fr",
            )


@dataclass(frozen=True)
class KnowledgeTemplate:
    """How one row of a knowledge source is put into words; `{field}` names a column (or, for RDF,
    `{subject}` and `{object}`)."""

    text: str = ""
    """A statement: pretraining text (empty: none)."""
    ask: tuple[str, ...] = ()
    """Questions about the row: each becomes a fine-tuning prompt, except the last, which is held
    out from training (asked in evaluation only) when there are two or more."""
    answer: str = ""
    """The fine-tuning completion and the expected answer (required with `ask`)."""


@dataclass(frozen=True)
class KnowledgeSource:
    """A database table, knowledge graph or row file verbalised into training data
    (flows/data/knowledge.py)."""

    source: str = ""
    """A SQLAlchemy URL (sqlite:///path.db, postgresql://...), an RDF file (.nt, .ttl,
    .rdf/.xml/.owl) or a row file (.csv, .jsonl)."""
    query: str = ""
    """For a database: one SELECT statement; its columns are the template fields."""
    predicate: str = ""
    """For RDF: the predicate IRI; one row per (subject, object) of it."""
    templates: tuple[KnowledgeTemplate, ...] = ()
    """How each row is put into words."""
    holdout_fraction: float = 0.1
    """Share of the rows (chosen by a stable hash of the row) never trained on: the held-out
    facts."""

    def __post_init__(
        self,
    ) -> None:  # what a source needs (a source, templates) is checked where it is read
        check(
            0.0 <= self.holdout_fraction < 1.0,
            "holdout_fraction",
            self.holdout_fraction,
            "in [0, 1)",
        )


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing: raw text in, a versioned dataset directory of token shards out."""

    inputs: tuple[str, ...] = unhashed((BUILTIN_CORPUS,), why=_BY_CONTENT)
    """Files, folders, globs or fsspec URLs of .txt/.md/.jsonl/.json/.parquet (optionally
    .gz/.zst)."""
    sft_inputs: tuple[str, ...] = unhashed((), why=_BY_CONTENT)
    """Fine-tuning JSONL files: {"prompt", "completion"} or {"messages": [{"role", "content"}]}."""
    hf_dataset: str | None = unhashed(None, why=_BY_CONTENT)
    """A Hugging Face `datasets` source: a hub name, or a local `save_to_disk` directory."""
    hf_config: str | None = unhashed(None, why=_BY_CONTENT)
    """The dataset's configuration name, if it has several."""
    hf_split: str = unhashed("train", why=_BY_CONTENT)
    """The split to read from the `datasets` source."""
    hf_data_files: tuple[str, ...] = unhashed((), why=_BY_CONTENT)
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
    tokenizer_path: str | None = unhashed(None, why=_BY_CONTENT)
    """Use this tokenizer (tokenizer.json, a directory, or GPT-2 vocab.json+merges.txt) instead of
    training one."""
    val_fraction: float = 0.01
    """Fraction of the tokens, chosen by content hash (whole documents, or pieces of long ones),
    that go to the validation split (at most 0.5); with val_min_tokens=0 too, there is no val
    split."""
    val_min_tokens: int = 20_000
    """Floor on the validation split's size in tokens; a corpus that cannot give it and a train
    split at least as large is an error (before any Ray work when the input sizes already show
    it)."""
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
    """Longest JSONL line, JSON array element or single-value .json file read; a longer one is
    skipped without holding it in memory and counted (`line_too_long`, `record_too_long`)."""
    num_workers: int = unhashed(0, why="how many tasks run at once never changes the dataset")
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
    max_drop_fraction: float = unhashed(
        0.05,
        why="it only decides whether a build is accepted: raising it after a failure resumes it",
    )
    """Most of the input records (documents; fine-tuning examples apart) that may be dropped because
    they could not be read as written -- unreadable files, truncated archives, malformed JSON,
    records without the text field -- before preprocessing fails naming the worst files (instead of
    training on partial data). The filters that drop by design (empty, too short, binary,
    duplicates, curation) do not count. 1 accepts any loss."""

    def __post_init__(self) -> None:
        check(0.0 <= self.val_fraction < 1.0, "val_fraction", self.val_fraction, "in [0, 1)")
        check(
            0.0 <= self.sft_val_fraction < 1.0,
            "sft_val_fraction",
            self.sft_val_fraction,
            "in [0, 1)",
        )
        for name in ("val_min_tokens", "sft_val_min_examples"):
            check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        check(self.val_piece_chars >= 64, "val_piece_chars", self.val_piece_chars, ">= 64")
        check(
            self.vocab_size >= 260, "vocab_size", self.vocab_size, ">= 260 (256 bytes + specials)"
        )
        check(self.shard_tokens > 0, "shard_tokens", self.shard_tokens, "> 0")
        check(self.work_unit_bytes > 0, "work_unit_bytes", self.work_unit_bytes, "> 0")
        check(self.min_chars >= 0, "min_chars", self.min_chars, ">= 0")
        check(self.num_workers >= 0, "num_workers", self.num_workers, ">= 0")
        check(self.min_work_units >= 1, "min_work_units", self.min_work_units, ">= 1")
        check(self.max_doc_chars >= 1, "max_doc_chars", self.max_doc_chars, ">= 1")
        check(self.min_frequency >= 0, "min_frequency", self.min_frequency, ">= 0")
        check(
            self.tokenizer_sample_chars >= 1,
            "tokenizer_sample_chars",
            self.tokenizer_sample_chars,
            ">= 1",
        )
        check(self.seed >= 0, "seed", self.seed, ">= 0")
        check(self.max_line_bytes >= 1, "max_line_bytes", self.max_line_bytes, ">= 1")
        check(
            0.0 <= self.max_drop_fraction <= 1.0,
            "max_drop_fraction",
            self.max_drop_fraction,
            "in [0, 1]",
        )
