"""Byte-level BPE: training, round trip on any Unicode, save/load, GPT-2 vocab files."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptcore import Tokenizer
from gptcore.tokenizer import EOT, PAD

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé text — with dashes, “quotes” and emoji 🙂.",
    "日本語のテキストも少し。",
] * 40


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=400, min_frequency=2)


def test_train_gives_specials_and_requested_size(tok):
    assert 258 < tok.vocab_size <= 400  # fewer when the corpus runs out of merges
    assert tok.token_to_id(EOT) == tok.eot_id == 0
    assert tok.token_to_id(PAD) == tok.pad_id == 1
    assert len(tok.encode("The quick brown fox")) < len("The quick brown fox")  # merges learned


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_batch_forms_match_single(tok):
    texts = ["hello", "", "fox 🙂", "return a + b"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode_batch(tok.encode_batch(texts)) == texts


def test_special_token_in_text_is_one_id(tok):
    ids = tok.encode(f"a{EOT}b")
    assert ids.count(tok.eot_id) == 1 and len(ids) == 3
    assert tok.decode(ids) == f"a{EOT}b"


def test_save_load_file_and_directory(tok, tmp_path):
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    for where in (tmp_path, path):
        loaded = Tokenizer.load(where)
        assert loaded.to_json() == tok.to_json()
        assert loaded.encode("lazy dog 🙂") == tok.encode("lazy dog 🙂")
    assert Tokenizer.load(path).sha256() == tok.sha256()


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        Tokenizer.load(tmp_path / "nothing-here.json")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(bad)


def test_gpt2_vocab_and_merges_encode_like_transformers(tmp_path):
    """A GPT-2-format vocabulary (vocab.json + merges.txt) encodes exactly as transformers'
    GPT2Tokenizer."""
    transformers = pytest.importorskip("transformers")
    trained = Tokenizer.train(CORPUS, vocab_size=350)
    model = json.loads(trained.to_json())["model"]
    vocab = dict(model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    ours = Tokenizer.load(tmp_path)
    theirs = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for text in CORPUS[:4] + ["  leading spaces", "tabs\tand\nnewlines", "numbers 12345 and 's 't"]:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.eot_id == theirs.convert_tokens_to_ids(EOT)


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], vocab_size=100)


def test_special_token_text_can_be_read_literally(tok):
    """Corpus text that quotes "<|endoftext|>" must not turn into a document boundary."""
    text = f"a {EOT} b {PAD}"
    literal = tok.encode(text, allow_special=False)
    assert tok.eot_id not in literal and tok.pad_id not in literal
    assert tok.decode(literal) == text
    assert tok.encode_batch([text], allow_special=False) == [literal]
    assert tok.eot_id in tok.encode(text)  # the default still parses it (prompts, GPT-2 parity)
