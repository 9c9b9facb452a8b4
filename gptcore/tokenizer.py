"""Byte-level BPE tokenizer: train, save, load (tokenizer.json, or GPT-2's vocab.json + merges.txt).

A thin, typed wrapper over Hugging Face `tokenizers`. Byte-level means every byte has a token, so
any Unicode string encodes, and decode(encode(s)) == s. No normalizer runs, for the same reason.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
PAD = "<|pad|>"


class Tokenizer:
    """Byte-level BPE with an end-of-text token (and a pad token, or eot standing in for it)."""

    def __init__(self, hf: HFTokenizer):
        self._hf = hf
        self._literal: HFTokenizer | None = None
        eot = hf.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"tokenizer has no {EOT} token")
        self.eot_id: int = eot
        pad = hf.token_to_id(PAD)
        self.pad_id: int = pad if pad is not None else eot  # GPT-2 has no pad token

    # ------------------------------------------------------------------ build

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
        """Learn merges from an iterable of strings; special tokens get ids 0 and 1."""
        if vocab_size < 258:
            raise ValueError(f"vocab_size={vocab_size} is too small: 256 bytes + 2 special tokens")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOT, PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte representable
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (a file, or a directory holding one) or GPT-2's vocab.json + merges.txt."""
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                path = path / "tokenizer.json"
            elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                return cls.from_gpt2_files(path / "vocab.json", path / "merges.txt")
            else:
                raise FileNotFoundError(f"{path}: holds neither tokenizer.json nor vocab.json + merges.txt")
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e

    @classmethod
    def from_gpt2_files(cls, vocab: str | Path, merges: str | Path) -> Tokenizer:
        """GPT-2's own vocabulary: encodes exactly as GPT-2 does. ValueError naming the bad file."""
        _check_vocab_json(Path(vocab))
        try:
            bpe = models.BPE.from_file(str(vocab), str(merges))
        except Exception as e:  # tokenizers raises a bare Exception; vocab.json is already checked
            raise ValueError(f"{merges}: not a valid GPT-2 merges.txt for {vocab} ({e})") from e
        hf = HFTokenizer(bpe)
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        if hf.token_to_id(EOT) is None:
            raise ValueError(f"{vocab}: no {EOT} token in the vocabulary")
        hf.add_special_tokens([EOT])  # so "<|endoftext|>" in text maps to its single id
        return cls(hf)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        return cls(HFTokenizer.from_str(text))

    # ------------------------------------------------------------------ save

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (deterministic for equal tokenizers)."""
        return self._hf.to_str()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json to `path` (a file path, or a directory to put it in)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    # ------------------------------------------------------------------ use

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`. With allow_special=False, "<|endoftext|>" written in the text is
        encoded as plain characters, not as the special token (what corpus text needs: a document
        that quotes it must not get a fake document boundary)."""
        return self._for(allow_special).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True) -> list[list[int]]:
        return [e.ids for e in self._for(allow_special).encode_batch(list(texts), add_special_tokens=False)]

    def _for(self, allow_special: bool) -> HFTokenizer:
        if allow_special:
            return self._hf
        if self._literal is None:  # a copy that reads special-token text literally
            self._literal = HFTokenizer.from_str(self._hf.to_str())
            self._literal.encode_special_tokens = True
        return self._literal

    def decode(self, ids: Sequence[int]) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return self._hf.decode_batch([list(ids) for ids in batch], skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self._hf.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id}, pad_id={self.pad_id})"


def _check_vocab_json(path: Path) -> None:
    """vocab.json must be a JSON object of token -> id (tokenizers' own messages do not name the file)."""
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(vocab, dict):
        raise ValueError(f"{path}: expected a JSON object of token -> id, got {type(vocab).__name__}")
    bad = next(((k, v) for k, v in vocab.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
    if bad is not None:
        raise ValueError(f"{path}: token {bad[0]!r} has id {bad[1]!r}; ids must be integers >= 0")
