"""Which Ray gptflow uses is explicit: no address starts a fresh local Ray (a stale
/tmp/ray/ray_current_cluster is ignored), `auto` or RAY_ADDRESS joins, and an address where no Ray
answers is a ConfigError naming it, within a bounded time, instead of a hang.

The stale-file cases run in a subprocess with RAY_TMPDIR pointing at a temp dir of their own, so the
machine's real /tmp/ray (and any Ray another process runs) is never touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from flows.cluster import probe
from flows.config import ClusterConfig, ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with-block ends: nothing listens there


@pytest.fixture
def stale_ray_tmpdir():
    """A RAY_TMPDIR whose ray/ray_current_cluster names a dead head (as after a killed
    `ray start --head`). Short path under /tmp: Ray's unix socket paths live under it and have a
    length limit."""
    root = tempfile.mkdtemp(prefix="gfr", dir="/tmp")
    dead = f"127.0.0.1:{_closed_port()}"
    (Path(root) / "ray").mkdir()
    (Path(root) / "ray" / "ray_current_cluster").write_text(dead + "\n")
    yield root, dead
    shutil.rmtree(root, ignore_errors=True)


def _run(code: str, env_extra: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env_extra
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_no_address_starts_a_local_ray_and_ignores_a_stale_current_cluster_file(stale_ray_tmpdir):
    root, dead = stale_ray_tmpdir
    code = (
        "import ray\n"
        "from ray._private.services import canonicalize_bootstrap_address\n"
        "from flows.cluster import ensure_ray, shutdown_ray\n"
        "from flows.config import ClusterConfig\n"
        # what a plain ray.init() reads
        "print('ray would join', canonicalize_bootstrap_address(None))\n"
        "ensure_ray(ClusterConfig(num_cpus=1))\n"
        "print('joined', ray.get_runtime_context().gcs_address)\n"
        "print('cpus', ray.cluster_resources().get('CPU'))\n"
        "shutdown_ray()\n"
    )
    # A plain ray.init() here retries the dead GCS for ever: the timeout turns that into a failure.
    out = _run(code, {"RAY_TMPDIR": root})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    dead_port = dead.rpartition(":")[2]
    # The stale file is really there for Ray to find (Ray writes 127.0.0.1 as the node's own IP).
    would = next(line for line in lines if line.startswith("ray would join ")).split()[3]
    assert would.rpartition(":")[2] == dead_port
    joined = next(line for line in lines if line.startswith("joined ")).split()[1]
    assert joined != would
    assert "cpus 1.0" in lines  # our own instance, with the CPUs we asked for


def test_auto_with_a_stale_current_cluster_file_is_a_clear_error(stale_ray_tmpdir):
    root, dead = stale_ray_tmpdir
    code = (
        "from flows.cluster import ensure_ray\n"
        "from flows.config import ClusterConfig, ConfigError\n"
        "try:\n"
        "    ensure_ray(ClusterConfig(address='auto'))\n"
        "except ConfigError as e:\n"
        "    print('ConfigError:', e)\n"
    )
    out = _run(code, {"RAY_TMPDIR": root}, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ConfigError: cluster.address='auto'" in out.stdout, out.stdout
    assert f":{dead.rpartition(':')[2]})" in out.stdout and "no Ray answers there" in out.stdout, (
        out.stdout
    )


def test_ray_address_that_does_not_answer_fails_the_cli_with_one_line(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Some words of a document that is long enough to keep.\n" * 50)
    dead = f"127.0.0.1:{_closed_port()}"
    env = os.environ | {"RAY_ADDRESS": dead}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "preprocess",
            "--input",
            str(corpus),
            "--no-tracking",
            "--workdir",
            str(tmp_path / "w"),
            "--set",
            "data.val_min_tokens=0",
            "--set",
            "data.val_fraction=0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"RAY_ADDRESS={dead!r}" in out.stderr and "no Ray answers there" in out.stderr
    assert "Traceback" not in out.stderr


def test_probe_refuses_a_port_that_is_not_a_gcs_and_a_dashboard_url():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accepts and says nothing, like a service that is not Ray's
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        with pytest.raises(ConfigError, match=rf"cluster.address='127.0.0.1:{port}'.*no Ray GCS"):
            probe(f"127.0.0.1:{port}", "cluster.address", timeout=2)
    finally:
        stop.set()
        t.join()
        for c in accepted:
            c.close()
        server.close()
    with pytest.raises(ConfigError, match="dashboard"):
        probe("http://127.0.0.1:8265", "cluster.address")


def test_probe_accepts_a_live_gcs_with_token_auth(ray_local):
    import ray

    gcs = ray.get_runtime_context().gcs_address
    assert probe(gcs, "cluster.address") == gcs
    assert ClusterConfig().address is None
