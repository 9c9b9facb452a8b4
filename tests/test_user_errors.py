"""Errors a user can act on: a malformed manifest.json, bundle or Hugging Face config.json, a
corrupt safetensors file, bad GPT-2 vocab.json / merges.txt, an unwritable workdir, an out-of-range
setting -- each is one line naming the file (or key) and the problem, exit code 2, and a traceback
only with -v. Nothing is skipped without a count."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import typing
from collections import Counter
from pathlib import Path

import pytest

from flows import config as config_module
from flows.config import ConfigError
from flows.data.dataset import DataError, read_manifest
from tests.data.preprocess_data import document


def _gptflow(*args: str, cwd: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line_error(out: subprocess.CompletedProcess, *needles: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, out.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    import torch

    from gptcore import GPT, Tokenizer, preset, save_bundle

    tok = Tokenizer.train([document(i) for i in range(20)], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(
        preset(
            "tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, context_length=16
        )
    )
    return save_bundle(tmp_path_factory.mktemp("bundle") / "b", model, tok)


# --------------------------------------------------------------------------- malformed files


_GOOD_MANIFEST = {
    "format_version": 1,
    "dtype": "uint16",
    "vocab_size": 300,
    "eot_id": 0,
    "splits": {"train": {"shards": [{"file": "train/00000.bin", "tokens": 4}]}},
}


@pytest.mark.parametrize(
    "manifest, problem",
    [
        ([1, 2], "the top level must be a JSON object"),
        ({**_GOOD_MANIFEST, "splits": []}, "splits must be an object"),
        (
            {
                **_GOOD_MANIFEST,
                "splits": {"train": {"shards": [{"file": "train/00000.bin", "tokens": "4"}]}},
            },
            "splits.train.shards[0].tokens must be an integer",
        ),
        (
            {**_GOOD_MANIFEST, "splits": {"train": {"shards": [{"tokens": 4}]}}},
            "splits.train.shards[0].file",
        ),
        (
            {
                **_GOOD_MANIFEST,
                "splits": {"train": {"shards": [{"file": "../../etc/passwd", "tokens": 4}]}},
            },
            "a relative path inside the dataset directory",
        ),
        ({**_GOOD_MANIFEST, "vocab_size": "300"}, "vocab_size must be an integer"),
    ],
)
def test_a_malformed_manifest_names_the_file_and_the_key(tmp_path, manifest, problem):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "00000.bin").write_bytes(bytes(8))
    with pytest.raises(DataError) as e:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(e.value) and problem in str(e.value)


def test_a_malformed_manifest_through_the_cli_is_one_line_and_exit_2(tmp_path):
    data = tmp_path / "ds"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({**_GOOD_MANIFEST, "splits": []}))
    (data / "tokenizer.json").write_text("{}")
    out = _gptflow(
        "pretrain",
        "--data",
        str(data),
        "--no-tracking",
        "--workdir",
        str(tmp_path / "w"),
        cwd=tmp_path,
    )
    _one_line_error(out, str(data / "manifest.json"), "splits must be an object")
    verbose = _gptflow(
        "-v",
        "pretrain",
        "--data",
        str(data),
        "--no-tracking",
        "--workdir",
        str(tmp_path / "w"),
        cwd=tmp_path,
    )
    assert (
        verbose.returncode == 2 and "Traceback" in verbose.stderr and "DataError" in verbose.stderr
    )


@pytest.mark.parametrize(
    "config, problem",
    [
        ({"n_layer": 1.5}, "n_layer=1.5 must be an int"),
        ({"n_head": "2"}, "n_head='2' must be an int"),
        ({"dropout": "0.1"}, "dropout='0.1' must be a float"),
        ({"bias": 1}, "bias=1 must be a bool"),
    ],
)
def test_a_bundle_config_that_is_no_object_or_has_wrong_types_names_file_and_key(
    bundle, tmp_path, config, problem
):
    from gptcore import load_bundle
    from gptcore.bundle import BundleError

    bad = tmp_path / "b"
    shutil.copytree(bundle, bad)
    good = json.loads((bundle / "config.json").read_text())
    (bad / "config.json").write_text(
        json.dumps({**good, **config} if isinstance(config, dict) else config)
    )
    with pytest.raises(BundleError) as e:
        load_bundle(bad)
    assert f"{bad / 'config.json'}: {problem}" in str(e.value)


def test_a_bundle_with_a_wrong_type_through_the_cli_is_one_line_and_exit_2(bundle, tmp_path):
    bad = tmp_path / "b"
    shutil.copytree(bundle, bad)
    good = json.loads((bundle / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**good, "n_layer": 1.5}))
    _one_line_error(
        _gptflow("generate", str(bad), "hi", cwd=tmp_path), str(bad / "config.json"), "n_layer=1.5"
    )


@pytest.fixture
def hf_dir(bundle, tmp_path) -> Path:
    from gptcore import load_bundle
    from gptcore.hf import export_gpt2

    model, tok, _ = load_bundle(bundle)
    return export_gpt2(model, tmp_path / "hf", tok)


@pytest.mark.parametrize(
    "config, problem",
    [
        ([1], "expected a JSON object, got list"),
        ({"n_layer": "1"}, "n_layer='1' must be an integer"),
        ({"layer_norm_epsilon": "tiny"}, "layer_norm_epsilon='tiny' must be a number"),
    ],
)
def test_a_hugging_face_config_that_is_no_object_or_has_wrong_types_names_the_file(
    hf_dir, config, problem
):
    from gptcore.hf import import_gpt2

    good = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(
        json.dumps({**good, **config} if isinstance(config, dict) else config)
    )
    with pytest.raises(ValueError) as e:
        import_gpt2(hf_dir)
    assert f"{hf_dir / 'config.json'}: {problem}" in str(e.value)


def test_a_corrupt_safetensors_file_in_a_hugging_face_directory_names_the_file(hf_dir, tmp_path):
    from flows.context import StepContext
    from flows.train.prepare import resolve_init
    from gptcore.hf import import_gpt2

    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{weights}: unreadable or truncated"):
        import_gpt2(hf_dir)
    with pytest.raises(
        ConfigError, match="model.safetensors: unreadable or truncated"
    ):  # how training reports it
        resolve_init(str(hf_dir), StepContext(workdir=tmp_path / "w"), "finetune")


def test_bad_gpt2_vocab_and_merges_name_the_bad_file(tmp_path):
    from gptcore import Tokenizer

    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3}
    cases = {
        "not json": ("{not json", "#version: 0.2\na b\n", "vocab.json: not readable JSON"),
        "a list": ("[1, 2]", "#version: 0.2\na b\n", "vocab.json: expected a JSON object"),
        "string id": (
            json.dumps({**vocab, "a": "1"}),
            "#version: 0.2\na b\n",
            "vocab.json: token 'a' has id '1'",
        ),
        "3 tokens a line": (
            json.dumps(vocab),
            "#version: 0.2\na b c\n",
            "merges.txt: not a valid GPT-2 merges.txt",
        ),
        "unknown token": (
            json.dumps(vocab),
            "#version: 0.2\nq z\n",
            "merges.txt: not a valid GPT-2 merges.txt",
        ),
    }
    for name, (v, m, problem) in cases.items():
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        (d / "vocab.json").write_text(v)
        (d / "merges.txt").write_text(m)
        with pytest.raises(ValueError) as e:
            Tokenizer.load(d)
        assert f"{d}/{problem}" in str(e.value), (name, str(e.value))


def test_a_permission_error_on_the_workdir_is_one_line_and_exit_2(tmp_path):
    """Real permissions: as root, without the capability that ignores them (setpriv)."""
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permission bits do not apply")
        prefix = (
            "setpriv",
            "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search",
        )
    (tmp_path / "corpus.txt").write_text(document(1, 300))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        out = _gptflow(
            "preprocess",
            "--input",
            str(tmp_path / "corpus.txt"),
            "--workdir",
            str(locked / "w"),
            "--no-tracking",
            cwd=tmp_path,
            prefix=prefix,
        )
    finally:
        locked.chmod(0o755)
    _one_line_error(out, "Permission denied", str(locked / "w"))


# --------------------------------------------------------------------------- settings out of range


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
        ({"top_p": 0.0}, "top_p=0.0 must be in (0, 1]"),
        ({"top_k": 0}, "top_k=0 must be an integer >= 1"),
        ({"temperature": float("nan")}, "temperature=nan must be a finite number >= 0"),
        ({"temperature": -0.5}, "temperature=-0.5 must be a finite number >= 0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty=0.0 must be a finite number > 0"),
    ],
)
def test_out_of_range_sampling_settings_are_errors_not_ignored(bundle, kwargs, problem):
    from gptcore import generate, generate_stream, load_bundle

    model, _, _ = load_bundle(bundle)
    with pytest.raises(ValueError) as e:
        generate(model, [1, 2], 3, **{"temperature": 1.0, **kwargs})
    assert problem in str(e.value)
    with pytest.raises(ValueError):
        list(generate_stream(model, [1, 2], 3, **{"temperature": 1.0, **kwargs}))


def test_out_of_range_sampling_flags_of_gptflow_generate_are_exit_2(bundle, tmp_path):
    _one_line_error(
        _gptflow(
            "generate", str(bundle), "hi", "--temperature", "1", "--top-p", "1.5", cwd=tmp_path
        ),
        "--top-p=1.5 must be in (0, 1]",
    )
    _one_line_error(
        _gptflow("generate", str(bundle), "hi", "--top-k", "0", cwd=tmp_path), "--top-k=0"
    )
    _one_line_error(
        _gptflow("generate", str(bundle), "hi", "--temperature", "nan", cwd=tmp_path),
        "--temperature=nan",
    )


def _config_classes() -> list[type]:
    """Every section flows.config composes (defined there or beside its stage, in
    flows/*/config.py)."""
    return [
        c
        for c in vars(config_module).values()
        if isinstance(c, type)
        and dataclasses.is_dataclass(c)
        and c.__module__.startswith("flows.")
        and c.__module__.endswith(".config")
    ]


def _numeric_fields(cls: type) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        args = set(typing.get_args(hints[f.name])) - {type(None)} or {hints[f.name]}
        kind = next((t for t in (int, float) if t in args), None)
        if kind is not None and bool not in args:
            out.append((f.name, kind))
    return out


def test_every_numeric_setting_of_every_config_section_is_range_checked():
    """A setting nobody checks takes any value; this enumerates them, so a new one cannot slip
    by."""
    unchecked = []
    checked = 0
    for cls in _config_classes():
        base = cls()
        for name, kind in _numeric_fields(cls):
            bad_values = [-(10**9)] if kind is int else [math.nan, math.inf, -1e30]
            for bad in bad_values:
                try:
                    dataclasses.replace(base, **{name: bad})
                except ConfigError as e:
                    assert name in str(e), str(e)
                    checked += 1
                else:
                    unchecked.append(f"{cls.__name__}.{name}={bad!r}")
    assert not unchecked, f"accepted without a range check: {unchecked}"
    assert checked > 40  # the enumeration found the fields


def test_eval_batches_is_validated_with_the_key_named():
    with pytest.raises(ConfigError, match=r"pretrain\.eval_batches=0 is invalid: must be >= 1"):
        config_module.load_config(None, ["pretrain.eval_batches=0"])


# --------------------------------------------------------------------------- skipped, and counted


def test_hidden_files_in_an_input_folder_are_skipped_and_counted(tmp_path):
    from flows.data.inputs import resolve_paths

    (tmp_path / "a.txt").write_text("a document")
    (tmp_path / ".notes.txt").write_text("hidden")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "description.txt").write_text("hidden folder")
    (tmp_path / "DONE").write_text("{}")  # a stage marker: bookkeeping, not a skipped input
    skipped: Counter = Counter()
    assert resolve_paths((str(tmp_path),), "data.inputs", skipped) == [
        str((tmp_path / "a.txt").resolve())
    ]
    assert skipped == Counter(hidden_file=2)
    skipped = Counter()
    assert (
        len(resolve_paths((tmp_path.as_uri(),), "data.inputs", skipped)) == 1
    )  # an fsspec folder too
    assert skipped["hidden_file"] == 2
