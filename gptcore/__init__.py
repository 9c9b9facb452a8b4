"""gptcore: a clean GPT you can read — config, model, byte-level BPE tokenizer, generation, bundles.

Depends on torch, tokenizers, safetensors and numpy only: no Ray, DeepSpeed or MLflow.
"""

from gptcore.bundle import load_bundle, save_bundle
from gptcore.config import PRESETS, GPTConfig, preset
from gptcore.generate import generate, generate_stream
from gptcore.model import GPT, KVCache
from gptcore.tokenizer import Tokenizer

__all__ = [
    "GPT",
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
