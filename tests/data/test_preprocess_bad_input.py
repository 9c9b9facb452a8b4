"""Bad input: each kind is repaired or skipped and counted by reason, good documents always survive,
and inputs that cannot work fail with a clear error before any Ray work starts."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import zstandard

from flows.config import DataConfig, PipelineConfig, TrackingConfig
from flows.data.dataset import read_manifest as load_manifest
from flows.data.inputs import InputError
from tests.data.preprocess_data import document, documents_of, shard_tokens
from tests.steps import preprocess

GOOD = {
    name: document(seed, 120)
    for seed, name in enumerate(
        ["good1.txt", "good2.md", "utf8.txt", "nul.txt", "control.txt", "crlf.txt", "good.txt.zst"]
    )
}


def config(workdir: Path, **data) -> PipelineConfig:
    defaults = dict(vocab_size=400, min_chars=16, val_fraction=0.0, val_min_tokens=0)
    defaults.update(data)
    return PipelineConfig(
        workdir=str(workdir), data=DataConfig(**defaults), tracking=TrackingConfig(enabled=False)
    )


def _gzip_truncated(text: bytes) -> bytes:
    blob = gzip.compress(text)
    return blob[: len(blob) // 2]


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "good1.txt").write_text(GOOD["good1.txt"])
    (root / "good2.md").write_text(GOOD["good2.md"])
    u = GOOD["utf8.txt"].encode()
    (root / "utf8.txt").write_bytes(u[:50] + b"\xff\xfe\xc3" + u[50:])
    n = GOOD["nul.txt"]
    (root / "nul.txt").write_bytes((n[:40] + "\x00\x00" + n[40:]).encode())
    c = GOOD["control.txt"]
    (root / "control.txt").write_bytes((c[:30] + "\x08\x07\x1b" + c[30:]).encode())
    (root / "crlf.txt").write_bytes(GOOD["crlf.txt"].replace("\n", "\r\n").encode())
    (root / "good.txt.zst").write_bytes(
        zstandard.ZstdCompressor().compress(GOOD["good.txt.zst"].encode())
    )
    rng = random.Random(7)
    (root / "binary.txt").write_bytes(bytes(rng.randrange(256) for _ in range(20_000)))
    (root / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (root / "empty.txt").write_bytes(b"")
    (root / "short.txt").write_text("tiny")
    records = [
        json.dumps({"text": document(100, 60)}),
        '{"text": "broken json',
        json.dumps({"body": "no text field here, just a body that is long enough"}),
        json.dumps({"text": 12345}),
        json.dumps({"text": document(101, 60)}),
    ]
    (root / "records.jsonl").write_text("\n".join(records) + "\n")
    lines = "".join(json.dumps({"text": document(200 + i, 60)}) + "\n" for i in range(400)).encode()
    (root / "cut.jsonl.gz").write_bytes(_gzip_truncated(lines))
    (root / "cut.txt.gz").write_bytes(_gzip_truncated(document(300, 3000).encode()))
    return root


@pytest.fixture(scope="module")
def result(bad_corpus, tmp_path_factory, ray_local):
    out = preprocess(config(tmp_path_factory.mktemp("work"), inputs=(str(bad_corpus),)))
    m = load_manifest(out, verify=True)
    from gptcore import Tokenizer

    tok = Tokenizer.load(out / "tokenizer.json")
    docs = [tok.decode(d) for d in documents_of(shard_tokens(out, m, "train"), m["eot_id"])]
    return m, docs


def test_every_good_document_survives_cleaned(result):
    _, docs = result
    for name, text in GOOD.items():
        if name != "utf8.txt":  # repaired, checked below
            assert text.strip() in docs, f"{name} was lost"
    assert document(100, 60).strip() in docs and document(101, 60).strip() in docs


def test_invalid_utf8_is_repaired_and_counted(result):
    m, docs = result
    assert m["documents"]["repaired"]["invalid_utf8"] == 1
    bad = [d for d in docs if "\ufffd" in d]
    assert len(bad) == 1 and bad[0].replace("\ufffd", "") == GOOD["utf8.txt"].strip()


def test_binary_and_unsupported_files_are_skipped_and_counted(result):
    m, _ = result
    assert m["documents"]["dropped"]["binary"] == 1
    assert m["documents"]["dropped"]["unsupported_file"] == 1  # picture.png


def test_empty_files_and_short_documents_are_counted(result):
    m, _ = result
    assert m["documents"]["dropped"]["empty"] == 1
    assert m["documents"]["dropped"]["too_short"] == 1


def test_nul_bytes_and_control_characters_are_removed_and_counted(result):
    m, docs = result
    assert m["documents"]["repaired"]["nul_bytes"] == 1
    assert m["documents"]["repaired"]["control_chars"] == 2  # nul.txt and control.txt
    assert not any(ch in d for d in docs for ch in "\x00\x07\x08\x1b\r")


def test_malformed_jsonl_lines_and_records_without_text_are_counted(result):
    m, _ = result
    dropped = m["documents"]["dropped"]
    assert dropped["malformed_json"] == 1
    assert dropped["missing_text_field"] == 1
    assert dropped["bad_text_field"] == 1


def test_a_truncated_gzip_keeps_what_came_before_and_is_counted(result):
    m, docs = result
    assert m["documents"]["dropped"]["truncated_archive"] == 2  # cut.jsonl.gz and cut.txt.gz
    kept = [i for i in range(400) if document(200 + i, 60).strip() in docs]
    assert kept and kept == list(range(len(kept))), (
        "records before the cut must all be kept, in order"
    )
    assert len(kept) < 400


def test_all_counts_add_up(result):
    m, docs = result
    assert m["documents"]["kept"] == len(docs)


def test_more_unreadable_records_than_max_drop_fraction_fail_and_name_the_file(tmp_path, ray_local):
    """A truncated .gz (a download cut short, a file still being written) is one document of four
    lost: over data.max_drop_fraction, the preprocess fails naming it and the dataset is not marked
    done. The same inputs with a limit that allows the loss: built, in the same place (the limit
    shapes nothing), from the work units the failed attempt already read."""
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        (root / f"good{i}.txt").write_text(document(500 + i, 120))
    (root / "cut.txt.gz").write_bytes(_gzip_truncated(document(510, 3000).encode()))
    with pytest.raises(
        InputError,
        match=r"data.inputs: 1 of 4 records \(25.0%\) could not be read, more than "
        r"data.max_drop_fraction=0.05 allows; worst files: .*cut.txt.gz: 1 truncated_archive",
    ):
        preprocess(config(tmp_path / "w", inputs=(str(root),)))
    assert not list((tmp_path / "w" / "preprocess").glob("*/DONE"))
    assert not list((tmp_path / "w" / "preprocess").glob("*/manifest.json"))

    out = preprocess(config(tmp_path / "w", inputs=(str(root),), max_drop_fraction=0.25))
    assert (out / "DONE").is_file()
    assert load_manifest(out)["documents"]["dropped"] == {"truncated_archive": 1}
    assert [p.parent for p in (tmp_path / "w" / "preprocess").glob("*/DONE")] == [out]


def test_drops_by_design_do_not_count_against_max_drop_fraction(tmp_path, ray_local):
    """Exact duplicates, too-short documents and empty files are dropped on purpose: with none
    unreadable, even max_drop_fraction=0 accepts a corpus that is mostly such drops."""
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.txt").write_text(document(600, 120))
    for i in range(3):
        (root / f"copy{i}.txt").write_text(document(600, 120))
    (root / "short.txt").write_text("tiny")
    (root / "empty.txt").write_bytes(b"")
    m = load_manifest(
        preprocess(config(tmp_path / "w", inputs=(str(root),), max_drop_fraction=0.0))
    )
    assert m["documents"]["kept"] == 1
    assert m["documents"]["dropped"] == {"duplicate": 3, "empty": 1, "too_short": 1}


def test_a_missing_path_fails_before_ray(tmp_path, monkeypatch):
    import flows.cluster

    monkeypatch.setattr(flows.cluster, "ensure_ray", _no_ray)
    with pytest.raises(InputError, match=r"data.inputs: .*nope.txt does not exist"):
        preprocess(config(tmp_path, inputs=(str(tmp_path / "nope.txt"),)))
    with pytest.raises(InputError, match=r"pattern .*\*.md matches no files"):
        preprocess(config(tmp_path, inputs=(str(tmp_path / "*.md"),)))


def test_a_corpus_without_usable_text_fails_before_ray(tmp_path, monkeypatch):
    import flows.cluster

    monkeypatch.setattr(flows.cluster, "ensure_ray", _no_ray)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.txt").write_bytes(b"")
    with pytest.raises(InputError, match="every input file is empty"):
        preprocess(config(tmp_path, inputs=(str(tmp_path / "c"),)))
    (tmp_path / "c" / "blob.txt").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(InputError, match="no usable text"):
        preprocess(config(tmp_path, inputs=(str(tmp_path / "c"),)))


def test_only_too_short_documents_is_a_clear_error(tmp_path, ray_local):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("hi")
    with pytest.raises(InputError, match="every document was dropped"):
        preprocess(config(tmp_path, inputs=(str(tmp_path / "c"),)))


def _no_ray(*_args, **_kwargs):
    raise AssertionError("Ray was started for an input that should have failed first")


@pytest.mark.slow
def test_a_100mb_single_line_is_cut_into_pieces_in_bounded_ranges(tmp_path, ray_local):
    """No newline in 100 MB: byte ranges cut at character boundaries, pieces of max_doc_chars.
    The line repeats a 100-character sentence, so every 1M-character piece is the same document:
    one is kept and 99 are counted as duplicates (cheap to tokenize, yet every byte is read)."""
    sentence = (
        "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
    )
    sentence = sentence + "s" * (99 - len(sentence)) + " "
    assert len(sentence) == 100
    big = tmp_path / "c" / "line.txt"
    big.parent.mkdir()
    chunk = (sentence * 10_000).encode()
    with open(big, "wb") as f:
        for _ in range(100):
            f.write(chunk)
    out = preprocess(
        config(
            tmp_path,
            inputs=(str(big.parent),),
            work_unit_bytes=8_000_000,
            min_work_units=1,
            max_doc_chars=1_000_000,
            tokenizer_sample_chars=1_000_000,
        )
    )
    m = load_manifest(out)
    assert m["work_units"]["text"] == 13  # ceil(100 MB / 8 MB): no worker reads the whole file
    assert m["documents"]["kept"] == 1 and m["documents"]["dropped"] == {"duplicate": 99}
    from gptcore import Tokenizer

    tok = Tokenizer.load(out / "tokenizer.json")
    (doc,) = documents_of(shard_tokens(out, m, "train"), m["eot_id"])
    assert tok.decode(doc) == (sentence * 10_000).strip()


def test_bom_json_and_literal_special_tokens_and_corrupt_zst(tmp_path, ray_local):
    """A UTF-8 byte-order mark (Windows tools) loses no record; "<|endoftext|>" quoted in a document
    is text, not a document boundary; a corrupt .zst is counted, not a crash."""
    root = tmp_path / "in"
    root.mkdir()
    docs = [document(300 + i, 60) for i in range(4)]
    bom = b"\xef\xbb\xbf"
    (root / "a.jsonl").write_bytes(
        bom + "\n".join(json.dumps({"text": d}) for d in docs[:2]).encode()
    )
    (root / "b.json").write_bytes(
        bom + json.dumps([{"text": d} for d in docs[2:]], indent=2).encode()
    )
    quoted = document(310, 60) + "The separator token is written <|endoftext|> in GPT-2 code.\n"
    (root / "quoted.txt").write_text(quoted)
    (root / "broken.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(200)))
    out = preprocess(
        config(tmp_path / "w", inputs=(str(root),), max_drop_fraction=0.2)
    )  # 1 of 6 lost
    manifest = load_manifest(out)
    assert manifest["documents"]["kept"] == 5, manifest["documents"]
    assert "malformed_json" not in manifest["documents"]["dropped"]
    tokens = shard_tokens(out, manifest, "train")
    assert len(documents_of(tokens, manifest["eot_id"])) == 5  # the quoted token split nothing


def test_fsspec_url_input_and_json_array_of_strings(tmp_path, ray_local):
    """An fsspec URL (file:// here; s3:// and gs:// take the same path) reads like a local folder,
    and a .json array of plain strings counts each string as a document."""
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.txt").write_text(document(400, 80))
    (root / "strings.json").write_text(json.dumps([document(401, 60), document(402, 60)]))
    out = preprocess(config(tmp_path / "w", inputs=(root.as_uri(),)))
    manifest = load_manifest(out)
    assert manifest["documents"]["kept"] == 3, manifest["documents"]
    assert all(i["path"].startswith("file://") for i in manifest["inputs"]), manifest["inputs"]
