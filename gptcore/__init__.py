"""gptcore: a clean GPT you can read — config, model, byte-level BPE tokenizer, generation, bundles.

Depends on torch, tokenizers, safetensors, numpy, gguf and jinja2 only: no Ray, DeepSpeed or MLflow.
Names load on first use (PEP 562), so `from gptcore import Tokenizer` in a preprocessing worker
does not pay for importing torch. No submodule shares a name with an export: importing such a
submodule would rebind the package attribute (`gptcore.generate`) to the module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "GPTConfig": "gptcore.config",
    "PRESETS": "gptcore.config",
    "preset": "gptcore.config",
    "GPT": "gptcore.model",
    "KVCache": "gptcore.model",
    "Distillation": "gptcore.distillation",
    "Tokenizer": "gptcore.tokenizer",
    "generate": "gptcore.generation",
    "generate_stream": "gptcore.generation",
    "save_bundle": "gptcore.bundle",
    "load_bundle": "gptcore.bundle",
}

__all__ = [
    "GPT",
    "Distillation",
    "PRESETS",
    "GPTConfig",
    "KVCache",
    "Tokenizer",
    "generate",
    "generate_stream",
    "load_bundle",
    "preset",
    "save_bundle",
]

if TYPE_CHECKING:
    from gptcore.bundle import load_bundle, save_bundle
    from gptcore.config import PRESETS, GPTConfig, preset
    from gptcore.distillation import Distillation
    from gptcore.generation import generate, generate_stream
    from gptcore.model import GPT, KVCache
    from gptcore.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gptcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
