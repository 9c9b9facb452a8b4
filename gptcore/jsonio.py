"""Reading a JSON file that must hold one object, with errors that name the file.

Bundles (config.json, metadata.json), Hugging Face directories (config.json, tokenizer_config.json,
generation_config.json, vocab.json, the safetensors index) all start this way; json's own messages
name neither the file nor what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(
    path: str | Path, what: str = "a JSON object", error: type[ValueError] = ValueError
) -> dict[str, Any]:
    """The object in `path`; `error` (a ValueError) naming the file when it cannot be read, is not
    JSON, or holds something else than `what` expects (reported as "expected {what}, got list")."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise error(f"{path}: expected {what}, got {type(data).__name__}")
    return data
