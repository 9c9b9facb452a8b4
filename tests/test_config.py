"""Configuration: defaults, YAML, dotted overrides; unknown keys and wrong types name key and
file."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import ConfigError, PipelineConfig, load_config, stable_hash, to_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    assert isinstance(load_config(path), PipelineConfig)


def test_local_yaml_is_the_embedded_default():
    assert load_config(ROOT / "configs" / "local.yaml") == load_config(None)


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        None,
        [
            "pretrain.lr=3e-4",
            "pretrain.zero_stage=2",
            "data.inputs=[a.txt, b.txt]",
            "model.context_length=64",
            "tracking.enabled=false",
        ],
    )
    assert cfg.pretrain.lr == 3e-4 and cfg.pretrain.zero_stage == 2
    assert cfg.data.inputs == ("a.txt", "b.txt")
    assert cfg.model.context_length == 64
    assert cfg.tracking.enabled is False
    assert load_config(None, ["pretrain.lr=1"]).pretrain.lr == 1.0  # an int is a fine float


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("pretrain:\n  lr: 0.1\n  learning_rate: 0.2\n")
    with pytest.raises(ConfigError, match=r"p\.yaml.*pretrain\.learning_rate"):
        load_config(f)
    with pytest.raises(ConfigError, match="unknown key 'nosuch'"):
        load_config(None, ["nosuch.key=1"])


def test_wrong_type_names_key_and_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("pretrain:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"p\.yaml.*pretrain\.steps must be an integer"):
        load_config(f)
    with pytest.raises(ConfigError, match="tracking.enabled must be true or false"):
        load_config(None, ["tracking.enabled=3"])


def test_invalid_values_are_rejected():
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(None, ["pretrain.zero_stage=4"])
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["finetune.precision=int8"])
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config(None, ["pretrain.global_batch_size=7"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(None, ["pretrain.lr"])


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)


def test_hash_is_stable_and_sensitive():
    a = load_config(None)
    assert stable_hash(a.data) == stable_hash(load_config(None).data)
    assert stable_hash(a.data) != stable_hash(load_config(None, ["data.vocab_size=8000"]).data)
    assert to_dict(a)["data"]["inputs"] == ["builtin:python-docs"]


def test_override_values_yaml_cannot_parse_stay_strings_and_empty_sections_work(tmp_path):
    cfg = load_config(None, ["data.inputs=*.txt", "pretrain.run_name=%x"])
    assert cfg.data.inputs == ("*.txt",) and cfg.pretrain.run_name == "%x"
    f = tmp_path / "p.yaml"
    f.write_text("finetune:\npretrain:\n  steps: 3\n")
    cfg = load_config(f, ["finetune.steps=5"])
    assert cfg.finetune.steps == 5 and cfg.pretrain.steps == 3


def test_stage_check_errors_name_the_key_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.val_fraction=2"])
    assert "data.val_fraction" in str(err.value) and "data.data." not in str(err.value)


def test_the_cluster_pipeline_config_is_gpt2_124m_bf16_zero2_on_gpu_workers():
    cfg = load_config(ROOT / "configs" / "cluster.yaml")
    for train in (cfg.pretrain, cfg.finetune):
        assert (train.use_gpu, train.precision, train.zero_stage) == (True, "bf16", 2)
        assert train.num_workers > 1 and train.storage_path.startswith("s3://")
    assert cfg.model.preset == "gpt2-124m"
    assert cfg.workdir.startswith("/mnt/gptflow")  # the EFS mount cluster.yaml sets up
    assert cfg.cluster.address == "auto" and cfg.cluster.allow_no_auth is False
