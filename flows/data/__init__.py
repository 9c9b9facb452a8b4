"""Preprocessing: raw text in, a versioned dataset directory of token shards out.

Modules: stage (the Ray stage itself, which uses the others about in the order listed here),
sources (the stage's inputs, located and checked), inputs (specs resolved to files, described,
opened), redact (secrets out of URLs), knowledge_sources and knowledge (databases, RDF graphs and
row files read and put into words), units (work units planned from the inputs), tasks (the Ray
tasks, one work unit each), formats and jsonstream (per-format reading), clean (repairs and drops,
counted), curate/ (quality, PII, language, decontamination, near-duplicates), sft (fine-tuning
records), splits (which text is validation), shards (unit files and packed shards), manifest (what
the stage reports), dataset (the dataset-directory contract and its one reader), corpus (the
builtin offline corpus).
"""
