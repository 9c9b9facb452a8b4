"""Small real-text datasets in the preprocessing output layout, for the training tests and bench.

Text: docstrings of the installed Python standard library (real English and code, offline). The
layout follows the dataset-directory contract (manifest.json, tokenizer.json, train/val/sft shards
with sft loss masks), written directly so training tests do not depend on the preprocessing stage.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flows.train import faults
from gptcore import Tokenizer

STDLIB_MODULES = (
    "argparse",
    "collections/__init__",
    "functools",
    "inspect",
    "json/__init__",
    "pathlib",
    "shutil",
    "subprocess",
    "textwrap",
    "typing",
    "dataclasses",
    "logging/__init__",
    "random",
    "statistics",
    "string",
    "tempfile",
    "threading",
    "zipfile/__init__",
    "calendar",
    "difflib",
    "heapq",
    "bisect",
    "fractions",
    "decimal",
    "ipaddress",
    "email/message",
)


def stdlib_docs(max_chars: int = 400_000) -> list[tuple[str, str]]:
    """(qualified name, docstring) of modules, classes and functions of some stdlib modules, in
    order."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    out: list[tuple[str, str]] = []
    total = 0
    for mod in STDLIB_MODULES:
        path = lib / f"{mod}.py"
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    name = mod if isinstance(node, ast.Module) else f"{mod}.{node.name}"
                    out.append((name, doc))
                    total += len(doc)
            if total >= max_chars:
                return out
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write(root: Path, rel: str, arr: np.ndarray) -> tuple[str, str]:
    f = root / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    arr.tofile(f)
    return rel, _sha(f)


def make_dataset(
    root: Path,
    vocab_size: int = 512,
    max_chars: int = 400_000,
    tokenizer: Tokenizer | None = None,
    shards: int = 2,
) -> Path:
    """Write a dataset directory with train, val and sft splits; returns `root`."""
    docs = stdlib_docs(max_chars)
    texts = [d for _, d in docs]
    tok = tokenizer or Tokenizer.train(texts, vocab_size=vocab_size)
    dtype = np.uint16 if tok.vocab_size < 65536 else np.uint32
    root.mkdir(parents=True, exist_ok=True)
    tok.save(root / "tokenizer.json")

    def stream(items: list[str]) -> np.ndarray:
        ids: list[int] = []
        for row in tok.encode_batch(items):
            ids.extend(row)
            ids.append(tok.eot_id)
        return np.asarray(ids, dtype=dtype)

    val_docs = texts[::20]
    train_docs = [t for i, t in enumerate(texts) if i % 20]
    splits: dict = {}
    for split, items in (("train", train_docs), ("val", val_docs)):
        arr = stream(items)
        parts = np.array_split(arr, shards if split == "train" else 1)
        entries = []
        for i, part in enumerate(parts):
            rel, sha = _write(root, f"{split}/{i:05d}.bin", part)
            entries.append({"file": rel, "tokens": int(len(part)), "sha256": sha})
        splits[split] = {"shards": entries, "tokens": int(len(arr))}

    # SFT: "What does NAME do?" -> the docstring's first paragraph; train on the answer only.
    ids: list[int] = []
    mask: list[int] = []
    n = 0
    for name, doc in docs:
        prompt = f"Question: what does {name} do?\nAnswer:"
        completion = " " + doc.split("\n\n")[0][:300]
        p, c = tok.encode(prompt), tok.encode(completion) + [tok.eot_id]
        ids += p + c
        mask += [0] * len(p) + [1] * len(c)
        n += 1
    rel, sha = _write(root, "sft/00000.bin", np.asarray(ids, dtype=dtype))
    mrel, msha = _write(root, "sft/00000.mask.bin", np.asarray(mask, dtype=np.uint8))
    splits["sft"] = {
        "shards": [
            {
                "file": rel,
                "mask_file": mrel,
                "tokens": len(ids),
                "sha256": sha,
                "mask_sha256": msha,
                "examples": n,
            }
        ],
        "tokens": len(ids),
    }
    manifest = {
        "format_version": 1,
        "dtype": np.dtype(dtype).name,
        "tokenizer_sha256": tok.sha256(),
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "pad_id": tok.pad_id,
        "splits": splits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def unigram_entropy(root: Path, split: str = "train") -> float:
    """Entropy (nats/token) of the split's unigram distribution: the loss of the best context-free
    model."""
    manifest = json.loads((root / "manifest.json").read_text())
    counts = np.zeros(manifest["vocab_size"], dtype=np.float64)
    for shard in manifest["splits"][split]["shards"]:
        arr = np.fromfile(root / shard["file"], dtype=manifest["dtype"])
        counts += np.bincount(arr, minlength=len(counts))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@contextlib.contextmanager
def injected_faults(**wanted: int) -> Iterator[None]:
    """The training runs inside suffer these test-only faults (flows/train/faults.py: fail_at_step,
    nan_at_step), besides any already injected."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(faults.ENV, faults.encode(dataclasses.replace(faults.from_env(), **wanted)))
        yield
