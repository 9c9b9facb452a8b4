"""Byte-level BPE tokenizer: train, save, load (tokenizer.json, or GPT-2's vocab.json + merges.txt),
with the model's special tokens, chat template and stop tokens.

A thin, typed wrapper over Hugging Face `tokenizers`. Byte-level means every byte has a token, so
any Unicode string encodes, and decode(encode(s)) == s. No normalizer runs, for the same reason.

Beside tokenizer.json a tokenizer may have a tokenizer_config.json in Hugging Face's layout
(bos/eos/pad/unk tokens, `chat_template`, and gptcore's `stop_tokens`: where generation ends);
a Hugging Face directory may also hold chat_template.jinja and generation_config.json (its eos
ids). A tokenizer without any of these is a GPT trained here: `<|endoftext|>` ends the text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptcore.chat_template import check_template, render
from gptcore.jsonio import read_json_object

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Tokens that end an assistant's turn in the chat formats in use (ChatML, Llama 3, Phi-3, Gemma).
# One of them that the vocabulary has and the chat template writes is a stop token.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


class Tokenizer:
    """Byte-level BPE with an end-of-text token, the model's special tokens and chat template.

    `eot_id` separates documents in training data: `<|endoftext|>` where the vocabulary has it,
    else the eos token. `stop_ids` end generation: eos, the `stop_tokens`, then eot.
    """

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        stop_tokens: Sequence[str] = (),
    ):
        self._hf = hf
        self._literal: HFTokenizer | None = None
        if eos_token is None and hf.token_to_id(EOT) is not None:
            eos_token = EOT
        self.special_tokens: dict[str, str] = {}
        for key, token in zip(
            SPECIAL_KEYS, (bos_token, eos_token, unk_token, pad_token), strict=True
        ):
            if token is None:
                continue
            if hf.token_to_id(token) is None:
                raise ValueError(f"{key} {token!r} is not in the vocabulary")
            self.special_tokens[key] = token
        eot = hf.token_to_id(EOT)
        if eot is None:
            eot = hf.token_to_id(eos_token) if eos_token is not None else None
        if eot is None:
            raise ValueError(f"tokenizer has no {EOT} token and no eos_token")
        self.eot_id: int = eot
        pad = hf.token_to_id(pad_token or PAD)
        self.pad_id: int = pad if pad is not None else eot  # GPT-2 has no pad token
        if chat_template is not None:
            check_template(chat_template)
        self.chat_template: str | None = chat_template
        missing = [t for t in stop_tokens if hf.token_to_id(t) is None]
        if missing:
            raise ValueError(f"stop tokens {missing} are not in the vocabulary")
        self.stop_tokens: tuple[str, ...] = tuple(dict.fromkeys(stop_tokens))
        ids = [hf.token_to_id(eos_token)] if eos_token is not None else []
        ids += [hf.token_to_id(t) for t in self.stop_tokens] + [eot]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))

    # ------------------------------------------------------------------ build

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2
    ) -> Tokenizer:
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
        """Load tokenizer.json (a file, or a directory holding one, with the tokenizer_config.json,
        chat_template.jinja and generation_config.json beside it) or GPT-2's vocab.json +
        merges.txt."""
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                path = path / "tokenizer.json"
            elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                return cls.from_gpt2_files(path / "vocab.json", path / "merges.txt")
            else:
                raise FileNotFoundError(
                    f"{path}: holds neither tokenizer.json nor vocab.json + merges.txt"
                )
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
        settings = _read_settings(path.parent, hf)
        try:
            return cls(hf, **settings)
        except ValueError as e:
            raise ValueError(f"{path.parent / 'tokenizer_config.json'}: {e}") from e

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

    def with_settings(self, **changes: Any) -> Tokenizer:
        """The same vocabulary with other special tokens, chat template or stop tokens."""
        settings = {
            **self.special_tokens,
            "chat_template": self.chat_template,
            "stop_tokens": self.stop_tokens,
        }
        return Tokenizer(HFTokenizer.from_str(self._hf.to_str()), **{**settings, **changes})

    # ------------------------------------------------------------------ save

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (deterministic for equal tokenizers)."""
        return self._hf.to_str()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def config(self) -> dict[str, Any]:
        """tokenizer_config.json: the special tokens, chat template and stop tokens, in Hugging
        Face's layout (`stop_tokens` is gptcore's; transformers reads stop ids from
        generation_config.json)."""
        out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        if self.stop_tokens:
            out["stop_tokens"] = list(self.stop_tokens)
        return out

    @property
    def has_settings(self) -> bool:
        """Whether config() says more than a tokenizer trained here implies (and so needs
        saving)."""
        return self.config() != {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT}

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json to `path` (a file path, or a directory to put it in), and
        tokenizer_config.json beside it when has_settings."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")
        if self.has_settings:
            (path.parent / "tokenizer_config.json").write_text(
                json.dumps(self.config(), indent=2) + "\n", encoding="utf-8"
            )
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
        return [
            e.ids
            for e in self._for(allow_special).encode_batch(list(texts), add_special_tokens=False)
        ]

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

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **variables: Any,
    ) -> str:
        """The text of `messages` ({role, content} dicts) in the model's own chat template, as
        transformers' apply_chat_template(..., tokenize=False) renders it."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (a model trained without one)")
        return render(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **variables,
        )

    def special_texts(self) -> tuple[str, ...]:
        """The text of every special (control) token: in plain text it would encode as that
        token."""
        return tuple(t.content for t in self._hf.get_added_tokens_decoder().values() if t.special)

    def id_to_token(self, i: int) -> str | None:
        return self._hf.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id}, pad_id={self.pad_id}, "
            f"stop_ids={self.stop_ids}, chat_template={self.chat_template is not None})"
        )


def end_of_turn_tokens(hf: HFTokenizer, template: str | None) -> list[str]:
    """The END_OF_TURN tokens the vocabulary has and the chat template writes."""
    return [t for t in END_OF_TURN if template and t in template and hf.token_to_id(t) is not None]


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _settings_from_config(config: dict[str, Any], hf: HFTokenizer) -> dict[str, Any]:
    settings: dict[str, Any] = {key: _token_text(config.get(key)) for key in SPECIAL_KEYS}
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one is the chat's
        template = next(
            (
                t.get("template")
                for t in template
                if isinstance(t, dict) and t.get("name") == "default"
            ),
            None,
        )
    settings["chat_template"] = template if isinstance(template, str) else None
    stop = config.get("stop_tokens")
    if stop is None:  # not a gptcore bundle's: the template's end-of-turn tokens
        stop = end_of_turn_tokens(hf, settings["chat_template"])
    settings["stop_tokens"] = list(stop)
    return settings


def _read_settings(directory: Path, hf: HFTokenizer) -> dict[str, Any]:
    """The constructor's settings from the files beside tokenizer.json (none is required)."""
    config: dict[str, Any] = {}
    for name in (
        "special_tokens_map.json",
        "tokenizer_config.json",
    ):  # the second wins, as in transformers
        if (directory / name).is_file():
            data = read_json_object(directory / name)
            config.update({k: v for k, v in data.items() if v is not None})
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():  # transformers 5 writes the template here, and prefers it
        config["chat_template"] = jinja.read_text(encoding="utf-8")
    settings = _settings_from_config(config, hf)
    generation = directory / "generation_config.json"
    if generation.is_file() and "stop_tokens" not in config:
        eos = read_json_object(generation).get("eos_token_id")
        for i in eos if isinstance(eos, list) else [eos] if eos is not None else []:
            token = hf.id_to_token(i) if isinstance(i, int) and not isinstance(i, bool) else None
            if token is None:
                raise ValueError(
                    f"{generation}: eos_token_id {i!r} is not a token id of this vocabulary"
                )
            settings["stop_tokens"].append(token)
    return settings


def _check_vocab_json(path: Path) -> None:
    """vocab.json must be a JSON object of token -> id (tokenizers' own messages do not name the
    file)."""
    vocab = read_json_object(path, "a JSON object of token -> id")
    bad = next(
        (
            (k, v)
            for k, v in vocab.items()
            if isinstance(v, bool) or not isinstance(v, int) or v < 0
        ),
        None,
    )
    if bad is not None:
        raise ValueError(f"{path}: token {bad[0]!r} has id {bad[1]!r}; ids must be integers >= 0")
