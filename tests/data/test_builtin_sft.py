"""The builtin fine-tuning pairs ``builtin:python-sft``: built offline from the stdlib's source,
deterministic, signatures as prompts and docstring paragraphs as completions, never text of the
pretraining corpus ``builtin:python-docs``, and ready for the preprocess stage."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from flows.data import corpus


def _fresh() -> None:
    """Forget the parsed stdlib, so a materialization really redoes the work."""
    corpus._scan.cache_clear()
    corpus._sft_pairs.cache_clear()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A workdir whose builtin corpora are already written (where the stage looks for them), built
    from the stdlib here, not copied from a machine cache an older run filled."""
    root = tmp_path_factory.mktemp("work")
    _fresh()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GPTFLOW_CACHE", str(tmp_path_factory.mktemp("cache")))
        corpus.BUILTINS["builtin:python-sft"](root / "corpus" / "python-sft")
        corpus.BUILTINS["builtin:python-docs"](root / "corpus" / "python-docs")
    return root


@pytest.fixture(scope="module")
def records(workdir) -> list[dict]:
    lines = (
        (workdir / "corpus" / "python-sft" / corpus.SFT_FILE)
        .read_text(encoding="utf-8")
        .splitlines()
    )
    return [json.loads(line) for line in lines]


def test_two_materializations_are_byte_identical_and_the_second_call_is_free(
    workdir, tmp_path, monkeypatch
):
    first = workdir / "corpus" / "python-sft"
    _fresh()
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "another-cache"))
    again = corpus.materialize_sft(tmp_path / "python-sft")
    assert sorted(p.name for p in again.iterdir()) == ["DONE", corpus.SFT_FILE]
    for name in ("DONE", corpus.SFT_FILE):
        assert (first / name).read_bytes() == (again / name).read_bytes()
    before = {p.name: p.stat().st_mtime_ns for p in again.iterdir()}
    corpus.materialize_sft(again)
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == before


def test_a_new_workdir_copies_the_machines_built_corpus_without_parsing_the_stdlib(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "cache"))
    first = corpus.materialize_sft(tmp_path / "a" / "python-sft")
    _fresh()
    second = corpus.materialize_sft(tmp_path / "b" / "python-sft")
    assert corpus._sft_pairs.cache_info().misses == 0, "the second workdir parsed the stdlib again"
    assert second != first and not second.is_symlink()
    for name in ("DONE", corpus.SFT_FILE):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    built = [
        p.name for p in (tmp_path / "cache" / "corpus").iterdir() if not p.name.startswith(".")
    ]
    assert len(built) == 1 and built[0].startswith(f"{corpus.SFT_NAME}-")


def test_records_are_prompt_completion_pairs_of_bounded_size(records):
    assert 500 <= len(records) <= corpus.MAX_SFT_PAIRS
    for r in records:
        assert set(r) == {"prompt", "completion"} and all(isinstance(v, str) for v in r.values())
        c = r["completion"]
        assert corpus.MIN_COMPLETION_CHARS <= len(c) <= corpus.MAX_COMPLETION_CHARS
        assert c == " ".join(c.split()), "completions are whitespace-normalised"
    assert len({r["completion"] for r in records}) == len(records), (
        "one pair per distinct completion"
    )


def test_prompts_are_signatures_of_public_stdlib_definitions(records):
    for r in records:
        comment, signature, opener = r["prompt"].split("\n")
        assert comment.startswith("# ") and opener == '    """'
        qualname = comment[2:]
        parts = qualname.split(".")
        assert not any(p.startswith("_") for p in parts), qualname  # private names and modules
        assert not any(p in ("test", "tests") or p.startswith("test_") for p in parts[:-1]), (
            qualname
        )
        tree = ast.parse(r["prompt"] + '"""\n')  # close the opened docstring: valid Python
        (node,) = tree.body
        assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        assert node.name == parts[-1] and signature.startswith(("def ", "async def ", "class "))
        assert len(signature) <= corpus.MAX_SIGNATURE_CHARS


def test_no_completion_occurs_in_the_pretraining_corpus(workdir, records):
    """The separation rule: python-docs, whitespace normalised, contains no completion, so none can
    be scored as pretraining validation text (val is a part of those files)."""
    docs = workdir / "corpus" / "python-docs"
    files = sorted(docs.glob("*.txt"))
    assert len(files) > 500
    text = "\x00".join(" ".join(f.read_text(encoding="utf-8").split()) for f in files)
    assert sum(len(r["completion"]) for r in records) > 50_000
    leaked = [r["completion"] for r in records if r["completion"] in text]
    assert not leaked, leaked[:3]
    # The rule holds the corpora apart, it does not empty the pretraining one.
    assert sum(f.stat().st_size for f in files) > 1_800_000


def test_the_stage_turns_the_pairs_into_sft_and_sft_val(workdir, records, tmp_path, ray_local):
    from flows.config import DataConfig
    from flows.context import StepContext
    from flows.data.dataset import read_manifest
    from flows.data.splits import sft_val_count
    from flows.data.stage import preprocess
    from gptcore import Tokenizer

    tok = Tokenizer.train([r["completion"] for r in records], vocab_size=512).save(
        tmp_path / "tok.json"
    )
    data = DataConfig(inputs=(), sft_inputs=("builtin:python-sft",), tokenizer_path=str(tok))
    out = preprocess(
        data, tmp_path / "out", StepContext(workdir=workdir)
    )  # finds the written corpus
    m = read_manifest(out, verify=True)
    assert m["sft_examples"] == {"kept": len(records), "dropped": {}, "locations": {}}
    assert m["splits"]["sft_val"]["examples"] == sft_val_count(len(records), data) > 0
    assert m["splits"]["sft"]["examples"] == len(records) - m["splits"]["sft_val"]["examples"]
