"""cluster.yaml (the Ray cluster launcher config at the repository root) passes Ray's own
cluster-config schema, describes a head and an autoscaled GPU worker type, installs the project with
a CUDA torch and the cloud extra, mounts the shared workdir, points jobs at MLflow, keeps token
authentication on, and has a comment for every key."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "cluster.yaml").read_text()


def _validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_passes_rays_schema_and_a_broken_copy_does_not():
    cfg = yaml.safe_load(TEXT)
    _validate(cfg)
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = (
        9  # above its max_workers: refused
    )
    with pytest.raises(ValueError):
        _validate(broken)
    typo = copy.deepcopy(cfg)
    typo["setup_comands"] = typo.pop("setup_commands")
    with pytest.raises(Exception, match="setup_comands"):
        _validate(typo)


def test_cluster_yaml_has_a_head_and_gpu_workers_and_sets_up_the_project():
    cfg = yaml.safe_load(TEXT)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    gpu = [t for t in workers if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] >= t["min_workers"] >= 0 for t in gpu)
    setup = "\n".join(cfg["setup_commands"])
    assert "download.pytorch.org/whl/cu" in setup  # a CUDA torch, before the project
    assert "[cloud]" in setup and "mount -t nfs4" in setup and "/mnt/gptflow" in setup
    start = "\n".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2 and start.count("MLFLOW_TRACKING_URI=") == 2
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def test_the_mlflow_server_listens_on_the_heads_private_address_only():
    cfg = yaml.safe_load(TEXT)
    (server,) = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    host = re.search(r"--host[ =](\$\(.*?\)|\S+)", server)
    assert host, server
    assert host.group(1) not in ("0.0.0.0", "::", "[::]", "*"), (
        server
    )  # every interface: anyone who reaches the head
    assert host.group(1) == "$(hostname -I | awk '{print $1}')", (
        server
    )  # the address the nodes' MLFLOW_TRACKING_URI names
    start = "\n".join(cfg["head_start_ray_commands"])
    assert "MLFLOW_TRACKING_URI=http://$(hostname -I | awk '{print $1}'):5000" in start


def test_every_key_of_cluster_yaml_is_commented():
    lines = TEXT.splitlines()
    missing = []
    for i, line in enumerate(lines):
        if re.match(r"^\s*(- )?[\"~\w./-]+\"?:( |$)", line) and "#" not in line:
            above = lines[i - 1].strip() if i else ""
            if not above.startswith("#"):
                missing.append(f"line {i + 1}: {line.strip()}")
    assert not missing, missing
