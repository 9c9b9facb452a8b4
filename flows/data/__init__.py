"""Preprocessing: raw text in, a versioned dataset directory of token shards out.

Modules, in the order data flows through them: inputs (resolve specs, plan work units), formats
(per-format reading), clean (repairs and drops, counted), sft (fine-tuning records), shards (unit
files and packed shards), dataset (the dataset-directory contract and its one reader), stage (the
Ray stage itself), corpus (the builtin offline corpus).
"""
