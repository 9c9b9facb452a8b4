"""Real services a test starts and stops itself: an S3-compatible server (moto), a Ray head node,
an MLflow server. Each runs in its own process group and is stopped by its process id (SIGTERM to
the group, SIGKILL if it lingers) -- never by name, which would hit other users' processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL what is left after `grace` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # children may outlive the leader
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_until(check, what: str, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not up after {timeout} s")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:  # 401/404: something answers
        return e.code < 500


@contextlib.contextmanager
def moto_s3(log_dir: Path) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1; yields its endpoint URL."""
    port = free_port()
    with open(log_dir / "moto.log", "wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _http_ok(url), "moto_server", proc=proc)
        yield url
    finally:
        stop_group(proc)


def _node_ports() -> list[str]:
    """Free ports for every service of a node whose default is fixed (the agent's 52365, the client
    server's 10001, ...): another Ray on this machine may hold the defaults."""
    out = []
    for flag in (
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
        "--node-manager-port",
        "--object-manager-port",
    ):
        out += [flag, str(free_port())]
    return out


@contextlib.contextmanager
def _ray_node(
    args: list[str], log_path: Path, env: dict[str, str] | None
) -> Iterator[subprocess.Popen]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", *args, *_node_ports(), "--disable-usage-stats"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}"} | (env or {}),
        )
    try:
        yield proc
    finally:
        stop_group(proc)


@contextlib.contextmanager
def ray_head(
    temp_dir: Path,
    env: dict[str, str] | None = None,
    resources: str | None = None,
    num_cpus: int = 1,
) -> Iterator[dict[str, str]]:
    """`ray start --head --block` with its own --temp-dir and ports; yields gcs and dashboard
    addresses.

    Token authentication stays on (Ray's default). `ray start` may write
    /tmp/ray/ray_current_cluster; we remove it afterwards if it still names this head (a stale file
    is what makes plain ray.init() hang).
    """
    port, dash = free_port(), free_port()
    args = [
        "--head",
        "--port",
        str(port),
        "--num-cpus",
        str(num_cpus),
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--temp-dir",
        str(temp_dir),
        "--include-dashboard",
        "true",
        "--ray-client-server-port",
        str(free_port()),
    ]
    if resources:
        args += ["--resources", resources]
    temp_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _ray_node(args, temp_dir.parent / f"ray-head-{port}.log", env) as proc:
            dashboard = f"http://127.0.0.1:{dash}"
            wait_until(
                lambda: _http_ok(f"{dashboard}/api/version"),
                "ray head dashboard",
                timeout=120,
                proc=proc,
            )
            yield {"gcs": f"127.0.0.1:{port}", "dashboard": dashboard, "pid": str(proc.pid)}
    finally:
        current = Path("/tmp/ray/ray_current_cluster")
        with contextlib.suppress(OSError):
            if current.read_text().strip().endswith(f":{port}"):
                current.unlink()


@contextlib.contextmanager
def ray_worker_node(
    gcs: str,
    temp_dir: Path,
    num_cpus: int = 1,
    resources: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    """A second raylet joining `gcs` (`ray start --address`), with its own CPUs and resources;
    yields once it has joined. A joining node needs RAY_AUTH_MODE=token explicitly (only a head
    turns it on by default) and the cluster's token (~/.ray/auth_token on this machine).

    The node gets its own --temp-dir (`temp_dir`, kept short: Ray's sockets live under it). Without
    one it inherits the head's, and two raylets on one machine would share a runtime-env cache: when
    this node's last worker of a job exits, its agent deletes the job's working_dir under the head's
    driver (seen: the driver's cwd vanished before `register`). Nodes of a real cluster never share
    that directory."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "--address",
        gcs,
        "--num-cpus",
        str(num_cpus),
        "--node-ip-address",
        "127.0.0.1",
        "--temp-dir",
        str(temp_dir),
    ]
    if resources:
        args += ["--resources", resources]
    log = temp_dir / f"ray-worker-{free_port()}.log"
    with _ray_node(args, log, {"RAY_AUTH_MODE": "token"} | (env or {})) as proc:
        wait_until(
            lambda: b"Ray runtime started" in log.read_bytes(),
            "ray worker node",
            timeout=120,
            proc=proc,
        )
        yield proc


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a sqlite store and proxied artifacts under `root`; yields
    its URI."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    args = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root.resolve() / 'mlflow.db'}",
        "--artifacts-destination",
        str(root.resolve() / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(root / "mlflow-server.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _http_ok(f"{url}/health"), "mlflow server", timeout=120, proc=proc)
        yield url
    finally:
        stop_group(proc)
