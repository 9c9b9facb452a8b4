"""`gptflow import` and `gptflow export`: a pretrained model in, a gptcore bundle out, and back.

SOURCE is a Hugging Face directory (model_type llama or gpt2), a `.gguf` file, or `builtin:NAME`
(see sources.py). The bundle is written into a temporary directory beside the output and renamed
into place when complete, so a failure leaves the output directory as it was. Export writes a
Hugging Face directory (weights, config, tokenizer files, chat template, generation config) that
transformers loads unmodified.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from flows.models.sources import fetch_builtin, is_builtin

log = logging.getLogger(__name__)

DTYPES = ("fp32", "bf16")


def load_source(source: str, cache: Path | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """(GPT, Tokenizer, lineage metadata) of SOURCE; ValueError naming the file on bad input."""
    from gptcore.gguf import load_gguf
    from gptcore.hf import load_hf_model
    from gptcore.tokenizer import Tokenizer

    meta: dict[str, Any] = {"stage": "import", "source": source}
    path = fetch_builtin(source, cache) if is_builtin(source) else Path(source)
    if is_builtin(source) or path.suffix == ".gguf" or path.is_file():
        model, tok = load_gguf(path)
        meta["source_format"] = "gguf"
    elif path.is_dir():
        model = load_hf_model(path)
        try:
            tok = Tokenizer.load(path)
        except FileNotFoundError as e:
            raise ValueError(
                f"{path}: no tokenizer.json (nor vocab.json + merges.txt) beside the weights"
            ) from e
        meta["source_format"] = "huggingface"
    else:
        raise ValueError(f"{source}: not a file, a directory or builtin:NAME")
    if tok.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"{path}: the tokenizer has {tok.vocab_size} tokens but the embedding has "
            f"{model.config.vocab_size} rows"
        )
    return model, tok, meta


def import_model(
    source: str, out: str | Path, dtype: str = "fp32", cache: Path | None = None
) -> Path:
    """Write SOURCE as a bundle at `out` (replacing a bundle there only once the new one is
    complete)."""
    import torch

    from gptcore.bundle import save_bundle

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "metadata.json").is_file():
        raise ValueError(f"{out}: a non-empty directory that is not a bundle; choose another --out")
    model, tok, meta = load_source(source, cache)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    meta["dtype"] = dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.import-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_bundle(tmp, model, tok, meta)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("imported %s (%s parameters) into %s", source, f"{model.num_params():,}", out)
    return out


def _swap_in(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an old bundle at `out` goes aside first and is deleted after."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(new, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_model(bundle: str | Path, out: str | Path) -> Path:
    """A Hugging Face directory of the bundle: config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, chat_template.jinja, special_tokens_map.json, generation_config.json."""
    from gptcore.bundle import load_bundle
    from gptcore.hf import export_hf

    model, tok, _ = load_bundle(bundle)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not empty; export writes a new directory")
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ids = _token_ids(tok)
        export_hf(model, tmp, config_extra=ids)
        write_hf_tokenizer(tok, tmp, model.config.context_length)
        generation = {
            "bos_token_id": ids.get("bos_token_id"),
            "eos_token_id": list(tok.stop_ids),
            "pad_token_id": ids.get("pad_token_id"),
        }
        _write_json(
            tmp / "generation_config.json", {k: v for k, v in generation.items() if v is not None}
        )
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _token_ids(tok: Any) -> dict[str, int]:
    return {
        key.replace("_token", "_token_id"): tok.token_to_id(text)
        for key, text in tok.special_tokens.items()
        if key != "unk_token"
    }


def write_hf_tokenizer(tok: Any, directory: Path, context_length: int) -> None:
    """The tokenizer files transformers' AutoTokenizer reads; the template as transformers 5 writes
    it."""
    (directory / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
    config = {k: v for k, v in tok.config().items() if k not in ("chat_template", "stop_tokens")}
    config.update(
        model_max_length=context_length,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json", dict(tok.special_tokens))
    if tok.chat_template is not None:
        (directory / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
