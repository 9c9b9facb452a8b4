"""Small deterministic corpora and helpers shared by the preprocess tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

WORDS = (
    "the of and to in is was for on with as by at from that this which be are it not or have an "
    "but they their one all were when there been has more its will would so who into time only new "
    "some could these two may then first any like other than now people over such our years after "
    "model token python data train value function return list string error file path stage"
).split()


def document(seed: int, words: int = 200) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(max(1, words // 12)):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
    return "\n".join(lines) + "\n"


def write_corpus(root: Path, files: int = 24, jsonl_records: int = 40) -> Path:
    """Text files plus one JSONL file; doc 3 is repeated as an exact duplicate at the end."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"doc{i:03d}.txt").write_text(document(i, 150 + 17 * i), encoding="utf-8")
    with open(root / "records.jsonl", "w", encoding="utf-8") as f:
        for i in range(jsonl_records):
            f.write(json.dumps({"text": document(1000 + i, 80), "id": i}) + "\n")
    (root / "zz-duplicate.txt").write_text(document(3, 150 + 17 * 3), encoding="utf-8")
    return root


def shard_tokens(dataset: Path, manifest: dict, split: str) -> np.ndarray:
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    parts = [
        np.fromfile(dataset / s["file"], dtype=dtype) for s in manifest["splits"][split]["shards"]
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def documents_of(tokens: np.ndarray, eot: int) -> list[list[int]]:
    """Split a flat token stream at <|endoftext|> (every document ends with one)."""
    assert len(tokens) == 0 or tokens[-1] == eot, "stream must end with <|endoftext|>"
    cuts = np.flatnonzero(tokens == eot)
    out, start = [], 0
    for c in cuts:
        out.append(tokens[start:c].tolist())
        start = c + 1
    return out
