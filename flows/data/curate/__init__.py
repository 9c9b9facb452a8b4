"""Curation of pretraining text: per-document filters and the distributed near-duplicate search.

Per document, pure and tested on strings (no Ray): quality.py (Gopher, C4), language.py (CLD2),
pii.py (redaction), decontam.py (evaluation n-grams), minhash.py (signatures and band keys), and
apply.py, which chains them as ``data.curate`` says. Across the corpus: shuffle.py (band buckets by
hash partition, connected components). report.py writes ``<dataset>/curation/``.
"""
