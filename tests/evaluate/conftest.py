"""Fixtures for the evaluate tests: a small tokenizer, hand-written dataset directories, tiny
bundles.

Datasets are written directly in the dataset-directory layout (manifest.json, tokenizer.json,
little-endian uint16 shards, uint8 loss masks), so these tests need neither Ray nor preprocessing.
The text mixes ASCII with multi-byte characters (bits per byte must count bytes, not characters)
and HTML specials (the heatmap page must escape them).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from gptcore import GPT, Tokenizer, preset, save_bundle

CONTEXT = 32
SUBJECTS = ("The cat", "A dog", "My friend", "The café owner", "Our naïve robot", "The old man")
VERBS = ("sat on", "looked at", "jumped over", "wrote about", "dreamed of")
OBJECTS = ("the mat", "a <b>bold</b> & shiny box", "the river → sea", "the old tree", "a warm bed")


def corpus(docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
            for _ in range(rng.randint(3, 6))
        )
        for _ in range(docs)
    ]


def _write(root: Path, rel: str, data: np.ndarray) -> dict[str, str]:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data.tofile(path)
    return {"file": rel, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _docs_split(root: Path, name: str, tok: Tokenizer, docs: Sequence[str], shards: int) -> dict:
    """Documents, each followed by <|endoftext|>, dealt into `shards` shards at document
    boundaries."""
    entries = []
    for i, part in enumerate(np.array_split(np.arange(len(docs)), shards)):
        ids = [t for d in part.tolist() for t in [*tok.encode(docs[d]), tok.eot_id]]
        entry = _write(root, f"{name}/{i:05d}.bin", np.asarray(ids, dtype="<u2"))
        entries.append({**entry, "tokens": len(ids)})
    return {"shards": entries, "tokens": sum(e["tokens"] for e in entries)}


def _sft_split(root: Path, name: str, tok: Tokenizer, examples: Sequence[tuple[str, str]]) -> dict:
    """Prompt (mask 0) + completion (mask 1) + <|endoftext|> (mask 1) per example, in one shard."""
    ids: list[int] = []
    mask: list[int] = []
    for prompt, completion in examples:
        p, c = tok.encode(prompt, allow_special=False), tok.encode(completion, allow_special=False)
        ids += [*p, *c, tok.eot_id]
        mask += [0] * len(p) + [1] * (len(c) + 1)
    entry = _write(root, f"{name}/00000.bin", np.asarray(ids, dtype="<u2"))
    m = _write(root, f"{name}/00000.mask.bin", np.asarray(mask, dtype=np.uint8))
    shard = {
        **entry,
        "tokens": len(ids),
        "mask_file": m["file"],
        "mask_sha256": m["sha256"],
        "examples": len(examples),
    }
    return {"shards": [shard], "tokens": len(ids), "examples": len(examples)}


def write_dataset(
    root: Path,
    tok: Tokenizer,
    val: Sequence[str] | None = None,
    val_shards: int = 2,
    sft_val: Sequence[tuple[str, str]] | None = None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tok.save(root / "tokenizer.json")
    splits = {"train": _docs_split(root, "train", tok, corpus(20, seed=1), 1)}
    if val is not None:
        splits["val"] = _docs_split(root, "val", tok, val, val_shards)
    if sft_val is not None:
        splits["sft_val"] = _sft_split(root, "sft_val", tok, sft_val)
    manifest = {
        "format_version": 1,
        "dtype": "uint16",
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "pad_id": tok.pad_id,
        "tokenizer_sha256": hashlib.sha256((root / "tokenizer.json").read_bytes()).hexdigest(),
        "splits": splits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


SFT_VAL = (
    ("Q: what sat on the mat?\nA:", " The cat."),
    ("Q: where is the café?\nA:", " By the river → sea."),
)


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus(300, seed=0), vocab_size=300)


@pytest.fixture(scope="session")
def make_dataset(tmp_path_factory, tok) -> Callable[..., Path]:
    """write_dataset into a fresh directory: make_dataset(val=[...], sft_val=[...],
    tokenizer=...)."""

    def make(tokenizer: Tokenizer | None = None, **kw) -> Path:
        return write_dataset(tmp_path_factory.mktemp("dataset"), tokenizer or tok, **kw)

    return make


@pytest.fixture(scope="session")
def sft_examples() -> tuple[tuple[str, str], ...]:
    """The (prompt, completion) pairs of the `dataset` fixture's sft_val split."""
    return SFT_VAL


@pytest.fixture(scope="session")
def dataset(make_dataset) -> Path:
    """val in two shards (12 documents) and a two-example sft_val split."""
    return make_dataset(val=corpus(12, seed=2), sft_val=SFT_VAL)


def tiny_model(vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset("tiny", vocab_size=vocab_size, context_length=CONTEXT)).eval()


def train_briefly(model: GPT, tok: Tokenizer, steps: int = 60) -> GPT:
    """A few dozen Adam steps on the training text: enough to sit well below ln(vocab)."""
    ids = torch.tensor([t for d in corpus(200, seed=3) for t in [*tok.encode(d), tok.eot_id]])
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - CONTEXT - 1, (16,), generator=gen)
        batch = torch.stack([ids[s : s + CONTEXT + 1] for s in starts.tolist()])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def texts() -> Callable[[int, int], list[str]]:
    """corpus(docs, seed): documents of the test language."""
    return corpus


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory) -> Callable[[Tokenizer], Path]:
    """An untrained tiny bundle for any tokenizer."""

    def make(tokenizer: Tokenizer) -> Path:
        return save_bundle(
            tmp_path_factory.mktemp("bundle"), tiny_model(tokenizer.vocab_size), tokenizer, {}
        )

    return make


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory, tok) -> Path:
    return save_bundle(
        tmp_path_factory.mktemp("trained"), train_briefly(tiny_model(tok.vocab_size), tok), tok, {}
    )


@pytest.fixture(scope="session")
def untrained_bundle(make_bundle, tok) -> Path:
    return make_bundle(tok)
