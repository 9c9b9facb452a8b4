"""Shared test fixtures: one local Ray instance per session, small real data."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by every test that needs one (start-up costs seconds)."""
    from flows.cluster import ensure_ray, shutdown_ray
    from flows.config import ClusterConfig

    ensure_ray(ClusterConfig(num_cpus=2))
    yield
    shutdown_ray()
