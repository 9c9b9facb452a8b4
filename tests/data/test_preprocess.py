"""The preprocess stage end to end on a real local Ray instance: the dataset-directory contract,
determinism, skip on re-run, resume after a kill, the uint32 path, SFT masks, the `datasets`
path and MLflow logging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from flows.config import DataConfig, PipelineConfig, TrackingConfig
from flows.data.dataset import DataError as DatasetError
from flows.data.dataset import read_manifest as load_manifest
from tests.data.preprocess_data import document, documents_of, shard_tokens, write_corpus
from tests.steps import preprocess

pytestmark = pytest.mark.usefixtures("ray_local")


def config(workdir: Path, tracking: bool = False, **data) -> PipelineConfig:
    defaults = dict(
        vocab_size=512, min_chars=16, val_fraction=0.1, val_min_tokens=0, shard_tokens=4_000
    )
    defaults.update(data)
    return PipelineConfig(
        workdir=str(workdir), data=DataConfig(**defaults), tracking=TrackingConfig(enabled=tracking)
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def dataset(corpus, tmp_path_factory) -> Path:
    return preprocess(config(tmp_path_factory.mktemp("work"), inputs=(str(corpus),)))


def test_dataset_directory_follows_the_contract(dataset, corpus):
    m = load_manifest(dataset, verify=True)
    assert dataset.parent.name == "preprocess" and (dataset / "DONE").is_file()
    assert m["format_version"] == 1 and m["dtype"] == "uint16"
    assert (dataset / "tokenizer.json").is_file() and m["vocab_size"] <= 512
    assert [i["path"] for i in m["inputs"]][0].endswith("doc000.txt")
    assert all(i["fingerprint"].startswith("sha256:") for i in m["inputs"])
    # 25 text files + 40 records, one exact duplicate dropped.
    assert m["documents"] == {
        "kept": 64,
        "dropped": {"duplicate": 1},
        "repaired": {},
        "locations": {},
    }
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["documents"] + val["documents"] == 64 and val["documents"] > 0
    assert len(train["shards"]) > 1, (
        "shard_tokens=4000 must cut the train split into several shards"
    )
    assert all(s["tokens"] <= 4_000 for s in train["shards"])
    assert train["tokens"] == sum(s["tokens"] for s in train["shards"])
    assert m["splits"]["sft"] == {"shards": [], "tokens": 0, "examples": 0}
    assert not (dataset / "_work").exists()


def test_shards_decode_to_the_cleaned_documents_in_input_order(dataset):
    from gptcore import Tokenizer

    m = load_manifest(dataset)
    tok = Tokenizer.load(dataset / "tokenizer.json")
    docs = [tok.decode(d) for d in documents_of(shard_tokens(dataset, m, "train"), m["eot_id"])]
    docs += [tok.decode(d) for d in documents_of(shard_tokens(dataset, m, "val"), m["eot_id"])]
    expected = {document(i, 150 + 17 * i).strip() for i in range(24)}
    expected |= {document(1000 + i, 80).strip() for i in range(40)}
    assert sorted(docs) == sorted(expected)
    train_docs = [
        tok.decode(d) for d in documents_of(shard_tokens(dataset, m, "train"), m["eot_id"])
    ]
    order = [d for d in (document(i, 150 + 17 * i).strip() for i in range(24)) if d in train_docs]
    assert train_docs[: len(order)] == order  # input order kept within the split


def test_two_fresh_runs_are_byte_identical_whatever_the_worker_count(dataset, corpus, tmp_path):
    again = preprocess(config(tmp_path, inputs=(str(corpus),), num_workers=1))
    assert again.name == dataset.name  # same hash: config, inputs and tokenizer are the same
    a, b = load_manifest(dataset), load_manifest(again)
    assert a["tokenizer_sha256"] == b["tokenizer_sha256"]
    assert a["splits"] == b["splits"]
    for split in ("train", "val"):
        for s in a["splits"][split]["shards"]:
            assert (dataset / s["file"]).read_bytes() == (again / s["file"]).read_bytes()


def test_rerun_is_a_noop_that_returns_the_existing_output(dataset, corpus):
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    again = preprocess(config(dataset.parent.parent, inputs=(str(corpus),)))
    assert again == dataset
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before


def test_changed_input_or_config_gets_a_new_directory(corpus, dataset, tmp_path):
    other = preprocess(config(dataset.parent.parent, inputs=(str(corpus),), val_fraction=0.2))
    assert other != dataset and other.parent == dataset.parent


def test_load_manifest_names_the_missing_or_corrupt_file(dataset, tmp_path):
    with pytest.raises(DatasetError, match="manifest.json"):
        load_manifest(tmp_path)
    import shutil

    broken = tmp_path / "copy"
    shutil.copytree(dataset, broken)
    m = load_manifest(broken)
    shard = broken / m["splits"]["train"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    load_manifest(broken)  # same size: only verify=True reads the bytes
    with pytest.raises(DatasetError, match=r"train/00001\.bin.*sha256"):
        load_manifest(broken, verify=True)
    shard.unlink()
    with pytest.raises(DatasetError, match=r"train/00001\.bin.*missing"):
        load_manifest(broken)


_KILL_SCRIPT = (
    """
import sys
from flows.config import DataConfig, PipelineConfig, TrackingConfig
from flows.pipeline import run
cfg = PipelineConfig(workdir=sys.argv[1], data=DataConfig(**{args}), """
    """tracking=TrackingConfig(enabled=False))
run(cfg, only=["preprocess"])
"""
)


@pytest.mark.slow
def test_resume_after_the_driver_is_killed_mid_run(corpus, dataset, tmp_path, caplog):
    """SIGKILL the driver once some work units are done; the next run keeps them and finishes with
    shards identical to an uninterrupted run."""
    import ray

    args = dict(
        inputs=(str(corpus),),
        vocab_size=512,
        min_chars=16,
        val_fraction=0.1,
        val_min_tokens=0,
        shard_tokens=4_000,
    )
    script = _KILL_SCRIPT.replace("{args}", repr(args))
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], env=env, start_new_session=True
    )
    out = tmp_path / "preprocess" / dataset.name
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            metas = list((out / "_work" / "clean").glob("*.json"))
            if metas:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert not (out / "DONE").exists()
    done_units = {
        p: p.stat().st_mtime_ns
        for p in (out / "_work" / "clean").glob("*")
        if not p.name.startswith(".")
    }
    assert done_units

    with caplog.at_level("INFO", logger="flows.data.stage"):
        resumed = preprocess(config(tmp_path, inputs=(str(corpus),)))
    finished = len([p for p in done_units if p.suffix == ".json"])
    resumed_msg = [
        r.getMessage() for r in caplog.records if "already done (resuming)" in r.getMessage()
    ]
    assert resumed_msg and int(resumed_msg[0].split(": ")[1].split(" of ")[0]) >= finished
    assert resumed == out
    assert not list(resumed.rglob(".*.tmp-*")), "a temporary file of the killed run survived"
    a, b = load_manifest(dataset), load_manifest(resumed, verify=True)
    assert a["splits"] == b["splits"] and a["documents"] == b["documents"]


def test_uint32_shards_when_the_vocabulary_exceeds_65536(corpus, dataset, tmp_path):
    """A tokenizer whose merged tokens have ids >= 65536 must be written as uint32 without loss."""
    from gptcore import Tokenizer

    spec = json.loads((dataset / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    gap = 66_000
    keep_low = 258  # two specials + 256 bytes keep their ids; merges move above 65535
    shift = {old: (old if old < keep_low else old + gap) for old in vocab.values()}
    spec["model"]["vocab"] = {t: shift[i] for t, i in vocab.items()}
    spec["model"]["vocab"].update({f"<unused{i}>": keep_low + i for i in range(gap)})
    for added in spec["added_tokens"]:
        added["id"] = shift[added["id"]]
    big = tmp_path / "big-tokenizer.json"
    big.write_text(json.dumps(spec))
    tok = Tokenizer.load(big)
    assert tok.vocab_size > 65_536

    out = preprocess(config(tmp_path, inputs=(str(corpus),), tokenizer_path=str(big)))
    m = load_manifest(out, verify=True)
    assert m["dtype"] == "uint32" and m["vocab_size"] == tok.vocab_size
    tokens = shard_tokens(out, m, "train")
    assert tokens.dtype.itemsize == 4 and tokens.max() >= 65_536
    first = documents_of(tokens, m["eot_id"])[0]
    assert tok.decode(first) == document(0, 150).strip()


def test_sft_examples_carry_a_mask_over_the_completion_only(corpus, dataset, tmp_path):
    from gptcore import Tokenizer

    sft_file = tmp_path / "sft.jsonl"
    records = [
        {"prompt": "Question: what is two plus two?\nAnswer:", "completion": " four"},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "Red."},
            ]
        },
        {"prompt": "no completion here"},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ]
    sft_file.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    out = preprocess(
        config(
            tmp_path,
            inputs=(),
            sft_inputs=(str(sft_file),),
            sft_val_fraction=0.0,
            sft_val_min_examples=0,
            tokenizer_path=str(dataset / "tokenizer.json"),
            max_drop_fraction=0.5,
        )
    )  # 2 of the 5 records are broken on purpose
    m = load_manifest(out, verify=True)
    assert m["sft_examples"] == {
        "kept": 2,
        "dropped": {"malformed_json": 1, "missing_prompt_or_completion": 1, "no_assistant_turn": 1},
        "locations": {
            "malformed_json": [
                {"file": str(sft_file), "line": 5, "offset": sft_file.read_text().rindex("{not")}
            ],
            "missing_prompt_or_completion": [
                {"file": str(sft_file), "line": 3, "offset": mock.ANY}
            ],
            "no_assistant_turn": [{"file": str(sft_file), "line": 4, "offset": mock.ANY}],
        },
    }
    (shard,) = m["splits"]["sft"]["shards"]
    assert shard["examples"] == 2 and m["splits"]["train"]["shards"] == []
    ids = np.fromfile(out / shard["file"], dtype="<u2")
    mask = np.fromfile(out / shard["mask_file"], dtype=np.uint8)
    assert ids.shape == mask.shape and set(np.unique(mask)) == {0, 1}
    tok = Tokenizer.load(out / "tokenizer.json")
    ends = np.flatnonzero(ids == m["eot_id"])
    first, second = ids[: ends[0] + 1], ids[ends[0] + 1 : ends[1] + 1]
    m1, m2 = mask[: ends[0] + 1], mask[ends[0] + 1 : ends[1] + 1]
    assert tok.decode(first[m1 == 0]) == "Question: what is two plus two?\nAnswer:"
    assert tok.decode(first[m1 == 1]) == " four<|endoftext|>"
    assert tok.decode(second) == (
        "system: Be brief.\nuser: Name a colour.\nassistant: Blue.\n"
        "user: Another?\nassistant: Red.\n<|endoftext|>"
    )
    assert tok.decode(second[m2 == 1]) == "Blue.\nRed.\n<|endoftext|>"


def test_a_datasets_source_saved_to_disk_and_local_data_files(tmp_path, dataset):
    import datasets

    texts = [document(5000 + i, 60) for i in range(30)]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": texts, "n": list(range(30))}).save_to_disk(str(saved))
    tok = str(dataset / "tokenizer.json")
    out = preprocess(
        config(
            tmp_path / "w1", inputs=(), hf_dataset=str(saved), text_field="body", tokenizer_path=tok
        )
    )
    m = load_manifest(out, verify=True)
    assert m["documents"]["kept"] == 30 and m["inputs"][0]["fingerprint"].startswith("hf:")

    files = tmp_path / "part.jsonl"
    files.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    out2 = preprocess(
        config(
            tmp_path / "w2",
            inputs=(),
            hf_dataset="json",
            hf_data_files=(str(files),),
            text_field="body",
            tokenizer_path=tok,
        )
    )
    m2 = load_manifest(out2)
    assert m2["documents"]["kept"] == 30
    for split in ("train", "val"):  # same documents, same order, same tokenizer: same tokens
        assert np.array_equal(shard_tokens(out, m, split), shard_tokens(out2, m2, split))


def test_mlflow_run_has_params_counts_artifacts_and_the_input_dataset(
    corpus, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = preprocess(config(tmp_path, tracking=True, inputs=(str(corpus),)))
    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    runs = {
        r.info.run_name: r
        for r in client.search_runs([client.get_experiment_by_name("gptflow").experiment_id])
    }
    assert set(runs) == {"pipeline", "preprocess"}  # the step's run, nested under the pipeline's
    run = runs["preprocess"]
    assert run.data.tags["mlflow.parentRunId"] == runs["pipeline"].info.run_id
    assert run.info.status == "FINISHED" and run.data.tags["gptflow.stage"] == "preprocess"
    assert run.data.params["data.val_fraction"] == "0.1"
    assert run.data.metrics["documents.kept"] == 64
    assert run.data.metrics["documents.dropped.duplicate"] == 1
    m = load_manifest(out)
    assert run.data.metrics["tokens.train"] == m["splits"]["train"]["tokens"]
    assert run.data.metrics["tokens_per_s"] > 0
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "tokenizer.json"} <= names
    (ds_input,) = run.inputs.dataset_inputs
    assert ds_input.dataset.name.startswith(str(corpus))
