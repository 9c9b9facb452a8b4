"""Model bundle: the one on-disk form of a trained model that everything downstream loads.

A directory of four files: config.json (GPTConfig), model.safetensors (weights; the tied LM head
is not stored twice), tokenizer.json, metadata.json (format version, parameter count, lineage);
and a fifth, tokenizer_config.json (special tokens, chat template, stop tokens), for a tokenizer
that has more of those than `<|endoftext|>` (a bundle without one is read as before).
Loading never unpickles. Every failure names the file and what is wrong with it.

Saving is crash-safe: metadata.json goes first and comes back last, so a directory that has it is a
complete bundle; every file is written under a temporary name, fsynced, renamed, and the directory
fsynced. (gptcore cannot use flows.store; these few lines are its own.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptcore.config import GPTConfig
from gptcore.jsonio import read_json_object
from gptcore.model import GPT
from gptcore.tokenizer import Tokenizer

FORMAT_VERSION = 1
FILES = ("config.json", "model.safetensors", "tokenizer.json", "metadata.json")
_TIED = "lm_head.weight"  # same tensor as wte.weight unless the config unties it


class BundleError(ValueError):
    """A bundle file is missing, unreadable or inconsistent; the message names the file."""


def save_bundle(
    directory: str | Path, model: GPT, tokenizer: Tokenizer, metadata: dict[str, Any] | None = None
) -> Path:
    """Write the bundle; metadata.json (written last) holds `metadata` plus format version and
    size."""
    directory = Path(directory)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise BundleError(
            f"tokenizer vocab_size {tokenizer.vocab_size} "
            f"!= model vocab_size {model.config.vocab_size}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    # Overwriting a bundle: without its metadata.json the directory is no bundle until the new one
    # is complete, so a crash half-way never pairs new weights with an old config or tokenizer.
    if (directory / "metadata.json").exists():
        (directory / "metadata.json").unlink()
        _fsync_dir(directory)
    tied = model.config.tie_embeddings
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k != _TIED or not tied
    }
    _atomic(
        directory / "model.safetensors",
        lambda p: save_file(state, str(p), metadata={"format": "pt"}),
    )
    _atomic(
        directory / "config.json",
        lambda p: p.write_text(json.dumps(model.config.to_dict(), indent=2) + "\n"),
    )
    _atomic(
        directory / "tokenizer.json", lambda p: p.write_text(tokenizer.to_json(), encoding="utf-8")
    )
    settings = directory / "tokenizer_config.json"  # special tokens, chat template, stop tokens
    if tokenizer.has_settings:
        _atomic(
            settings,
            lambda p: p.write_text(
                json.dumps(tokenizer.config(), indent=2) + "\n", encoding="utf-8"
            ),
        )
    else:
        settings.unlink(missing_ok=True)
    meta = {**(metadata or {}), "format_version": FORMAT_VERSION, "num_params": model.num_params()}
    _atomic(
        directory / "metadata.json",
        lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"),
    )
    return directory


def load_bundle(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """Read a bundle into (model in eval mode, tokenizer, metadata)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"bundle directory {directory} does not exist")
    for name in FILES:
        if not (directory / name).is_file():
            raise BundleError(f"{directory / name}: missing (a bundle needs {', '.join(FILES)})")

    metadata = read_json_object(directory / "metadata.json", error=BundleError)
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{directory / 'metadata.json'}: format_version {version!r}, expected {FORMAT_VERSION}"
        )
    config = read_config(directory / "config.json")
    try:
        tokenizer = Tokenizer.load(directory / "tokenizer.json")
    except (ValueError, OSError) as e:
        raise BundleError(f"{directory / 'tokenizer.json'}: {e}") from e
    if tokenizer.vocab_size != config.vocab_size:
        raise BundleError(
            f"{directory / 'tokenizer.json'}: vocabulary of {tokenizer.vocab_size} "
            f"tokens does not match vocab_size={config.vocab_size} in config.json"
        )

    weights = directory / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise BundleError(f"{weights}: unreadable or truncated ({e})") from e
    model = GPT(config)
    tied = config.tie_embeddings
    expected = {k: v.shape for k, v in model.state_dict().items() if k != _TIED or not tied}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BundleError(
            f"{weights}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}"
        )
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise BundleError(
                f"{weights}: tensor {name} has shape "
                f"{tuple(state[name].shape)}, config.json implies {tuple(shape)}"
            )
    if tied:
        state[_TIED] = state["wte.weight"]
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.to(device=device, dtype=dtype or torch.float32).eval()
    return model, tokenizer, metadata


def read_config(path: str | Path) -> GPTConfig:
    """A bundle's config.json as a GPTConfig; BundleError naming the file, the key and the problem
    (not an object, an unknown key, a value of the wrong type or out of range)."""
    path = Path(path)
    data = read_json_object(path, error=BundleError)
    kinds = {
        f.name: f.type for f in dataclasses.fields(GPTConfig)
    }  # "int", "float", "bool" (postponed annotations)
    for key, value in data.items():
        kind = kinds.get(key)
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value),
            "bool": isinstance(value, bool),
            "bool | None": value is None or isinstance(value, bool),
            "str": isinstance(value, str),
        }.get(str(kind), True)
        if not ok:
            raise BundleError(
                f"{path}: {key}={value!r} must be a{'n' if kind == 'int' else ''} {kind}"
            )
    try:
        return GPTConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise BundleError(f"{path}: {e}") from e


def _atomic(path: Path, write: Any) -> None:
    """Write through a temporary name, fsync it, rename it over `path`, fsync the directory: a crash
    never leaves a half-written file at `path`, and once this returns the file survives a power
    loss."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # save_file and write_text close their file without fsync
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # a filesystem that cannot fsync a directory: the renames are all we can do
        pass
    finally:
        os.close(fd)
