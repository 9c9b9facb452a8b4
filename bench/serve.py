"""Serving throughput and latency over real HTTP on 127.0.0.1, all in one run (ratios, not absolute
times).

One model (the small preset's shape, 4 layers d=128, context 512, random weights: the point is the
serving machinery, not the text), registered in a real MLflow store, served five ways in turn on
one local Ray Serve instance (one replica, one at a time):

- continuous: gptflow's deployment (continuous batching, max_batch_size 16)
- off: the same deployment with max_batch_size 1 (batching off)
- static: a Ray Serve deployment with ``@serve.batch(max_batch_size=16)`` around gptcore.generate
  (static batching: the batch runs until its longest request ends)
- mlflow: ``mlflow models serve`` of the same registered model (what MLflow alone gives)

16 concurrent clients each send requests with max_tokens cycling through 16..256; completions/s and
generated tokens/s per variant. One client: p50 latency vs calling generate in-process, and time to
first token. Then load: 16 clients for --load-s seconds, streaming and not, with a promotion in the
middle; every status is counted. Targets: continuous >= 3x off, >= 1.3x static, >= 3x mlflow; p50
within 15% + 20 ms of in-process; zero 5xx and zero failed requests under load.

    python bench/serve.py [--requests-per-client 4] [--load-s 60]
"""

# No `from __future__ import annotations`: FastAPI reads the baseline route annotations at runtime.

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import save

from gptcore import GPT, GPTConfig, Tokenizer, generate, load_bundle, save_bundle

MIX = (16, 32, 64, 128, 256)
PROMPTS = (
    "The meaning of",
    "def parse(text):",
    "Once upon a time",
    "import os\n",
    "In the beginning",
)
CLIENTS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 300) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}


def stream(url: str, body: dict) -> tuple[int, float, str]:
    """(status, seconds to the first text event, whole text) of a streamed completion."""
    t0 = time.perf_counter()
    req = urllib.request.Request(
        url, json.dumps({**body, "stream": True}).encode(), {"Content-Type": "application/json"}
    )
    first, parts = None, []
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            for line in r:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return 500, 0.0, ""
                text = event["choices"][0].get("text", "") if event["choices"] else ""
                if text and first is None:
                    first = time.perf_counter() - t0
                parts.append(text)
            return r.status, first or 0.0, "".join(parts)
    except urllib.error.HTTPError as e:
        return e.code, 0.0, ""


def wait_http(url: str, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def throughput(send, tok: Tokenizer, per_client: int) -> dict:
    """16 clients at once, each `per_client` requests of max_tokens cycling through MIX."""

    def client(c: int) -> list[tuple[int, int]]:
        out = []
        for i in range(per_client):
            n = MIX[(c + i) % len(MIX)]
            status, text = send(PROMPTS[(c + i) % len(PROMPTS)], n)
            out.append((status, len(tok.encode(text)) if status == 200 else 0))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for rs in pool.map(client, range(CLIENTS)) for r in rs]
    wall = time.perf_counter() - t0
    ok = sum(1 for s, _ in results if s == 200)
    return {
        "requests": len(results),
        "ok": ok,
        "wall_s": round(wall, 2),
        "completions_per_s": round(ok / wall, 2),
        "tokens_per_s": round(sum(t for _, t in results) / wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--load-s", type=float, default=60.0)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))

    from ray import serve

    from flows.config import PipelineConfig, ServeConfig, TrackingConfig
    from flows.registry import pyfunc_model
    from flows.registry.register import pip_requirements
    from flows.serve.deploy import application, settings_for
    from flows.tracking import Registry, stage_run

    words = (
        "the of and to in is for on that by with as data model text token train serve batch".split()
    )
    gen = torch.Generator().manual_seed(0)
    text = [
        " ".join(words[int(i)] for i in torch.randint(len(words), (400,), generator=gen))
        for _ in range(50)
    ]
    tok = Tokenizer.train(text + list(PROMPTS), vocab_size=1024)
    tracking = TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}")
    registry = Registry(tracking, root)
    bundles = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = GPT(
            GPTConfig(
                vocab_size=tok.vocab_size, context_length=512, n_layer=4, n_head=4, d_model=128
            )
        )
        bundles[seed] = save_bundle(root / f"bundle{seed}", model, tok, {"stage": "pretrain"})
        with stage_run(tracking, root, "bench"):
            uri = registry.log_bundle_model(
                bundles[seed],
                pyfunc_model.__file__,
                [str(Path(__import__("gptcore").__file__).parent)],
                pip_requirements(),
                pyfunc_model.PARAMS,
                ["The "],
            )
        registry.register(uri, "bench", {})
    registry.set_alias("bench", "champion", "1")
    model, tok, _ = load_bundle(bundles[0])

    from flows.cluster import ensure_ray
    from flows.config import ClusterConfig

    ensure_ray(ClusterConfig(num_cpus=2))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    results: dict = {
        "model": "4 layers d128 ctx512 vocab 1024, random weights",
        "clients": CLIENTS,
        "max_tokens_mix": MIX,
    }

    def ours(name: str, **serve_keys):
        # One CPU per replica (the default; Ray gives an actor as many torch threads as CPUs it
        # reserves): a second torch thread made this small model's decoding slower here, not faster.
        c = PipelineConfig(
            workdir=str(root),
            tracking=tracking,
            serve=ServeConfig(max_tokens_limit=512, **serve_keys),
        )
        serve.run(
            application(c.serve, settings_for(c, model="bench@champion")),
            name=name,
            route_prefix=f"/{name}",
        )
        wait_http(f"{base}/{name}/healthz")
        return lambda p, n: _text(
            post(f"{base}/{name}/v1/completions", {"prompt": p, "max_tokens": n})
        )

    send = ours("continuous", max_batch_size=16)
    send("warm", 4)
    results["continuous"] = throughput(send, tok, args.requests_per_client)
    print("continuous", results["continuous"], flush=True)

    # one client: latency against generate in-process, and time to first token
    ids = tok.encode(PROMPTS[0])
    inproc, http = [], []
    for _ in range(30):  # interleaved, so that both see the same load on this shared machine
        t0 = time.perf_counter()
        generate(model, ids, 32, stop_ids=[tok.eot_id])
        inproc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        send(PROMPTS[0], 32)
        http.append(time.perf_counter() - t0)
    ttft = [
        stream(f"{base}/continuous/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 32})[1]
        for _ in range(10)
    ]
    p50_in, p50_http = statistics.median(inproc), statistics.median(http)
    results["single_client"] = {
        "p50_inprocess_s": round(p50_in, 4),
        "p50_http_s": round(p50_http, 4),
        "allowed_s": round(1.15 * p50_in + 0.020, 4),
        "ttft_p50_s": round(statistics.median(ttft), 4),
        "within_target": p50_http <= 1.15 * p50_in + 0.020,
    }
    print("single client", results["single_client"], flush=True)
    serve.delete("continuous")

    send = ours("off", max_batch_size=1)
    send("warm", 4)
    results["off"] = throughput(send, tok, args.requests_per_client)
    print("off", results["off"], flush=True)
    serve.delete("off")

    serve.run(StaticBatch.bind(str(bundles[0])), name="static", route_prefix="/static")
    wait_http(f"{base}/static/healthz")
    send = lambda p, n: _text(post(f"{base}/static/v1/completions", {"prompt": p, "max_tokens": n}))  # noqa: E731
    send("warm", 4)
    results["static"] = throughput(send, tok, args.requests_per_client)
    print("static @serve.batch", results["static"], flush=True)
    serve.delete("static")

    results["mlflow"] = mlflow_serve(tracking.uri, root, tok, args.requests_per_client)
    print("mlflow models serve", results["mlflow"], flush=True)

    results["load"] = load_with_promotion(ours, registry, base, args.load_s)
    print("load", results["load"], flush=True)
    serve.shutdown()

    c = results["continuous"]["completions_per_s"]
    results["ratios"] = {
        k: round(c / max(results[k]["completions_per_s"], 1e-9), 2)
        for k in ("off", "static", "mlflow")
    }
    results["targets"] = {
        "vs_off_3x": results["ratios"]["off"] >= 3,
        "vs_static_1.3x": results["ratios"]["static"] >= 1.3,
        "vs_mlflow_3x": results["ratios"]["mlflow"] >= 3,
        "single_client": results["single_client"]["within_target"],
        "load_zero_failures": results["load"]["failed"] == 0 and results["load"]["5xx"] == 0,
    }
    save("serve", results)


def _text(reply: tuple[int, dict]) -> tuple[int, str]:
    status, body = reply
    return status, body["choices"][0]["text"] if status == 200 else ""


def mlflow_serve(uri: str, root: Path, tok: Tokenizer, per_client: int) -> dict:
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/bench@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=open(root / "mlflow.log", "w"),
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping")

        def send(prompt: str, n: int) -> tuple[int, str]:
            status, body = post(
                f"http://127.0.0.1:{port}/invocations",
                {
                    "dataframe_split": {"columns": ["prompt"], "data": [[prompt]]},
                    "params": {"max_tokens": n},
                },
            )
            return status, body["predictions"][0] if status == 200 else ""

        send("warm", 4)
        return throughput(send, tok, per_client)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def load_with_promotion(ours, registry, base: str, seconds: float) -> dict:
    """16 clients for `seconds`, half streaming; the champion moves to version 2 halfway."""
    ours("follow", max_batch_size=16, poll_s=1.0)
    url = f"{base}/follow/v1/completions"
    counts = {"ok": 0, "5xx": 0, "4xx": 0, "failed": 0}
    lock = threading.Lock()
    stop = time.time() + seconds

    def client(c: int) -> None:
        i = 0
        while time.time() < stop:
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MIX[(c + i) % len(MIX)]}
            try:
                status = stream(url, body)[0] if c % 2 else post(url, body)[0]
                key = "ok" if status == 200 else "5xx" if status >= 500 else "4xx"
            except Exception:  # noqa: BLE001 - a dropped connection counts as a failed request
                key = "failed"
            with lock:
                counts[key] += 1
            i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(seconds / 2)
    registry.set_alias("bench", "champion", "2")
    for t in threads:
        t.join()
    with urllib.request.urlopen(f"{base}/follow/v1/models", timeout=10) as r:
        counts["version_after"] = json.loads(r.read())["data"][0]["version"]
    counts["seconds"] = seconds
    return counts


# --------------------------------------------------------------------- the static-batching baseline

from fastapi import FastAPI, Request  # noqa: E402
from ray import serve as _serve  # noqa: E402

static_api = FastAPI()


@_serve.deployment(max_ongoing_requests=64)
@_serve.ingress(static_api)
class StaticBatch:
    """What Ray Serve's own batching gives: requests that arrive together are generated together,
    and the batch runs until its longest request is done."""

    def __init__(self, bundle: str):
        self.model, self.tok, _ = load_bundle(bundle)

    @static_api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @static_api.post("/v1/completions")
    async def completions(self, request: Request) -> dict:
        body = await request.json()
        text = await self.batch((body["prompt"], int(body["max_tokens"])))
        return {"choices": [{"text": text}]}

    @_serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def batch(self, requests: list[tuple[str, int]]) -> list[str]:
        prompts = [self.tok.encode(p) for p, _ in requests]
        longest = max(n for _, n in requests)
        outs = await asyncio.to_thread(
            generate, self.model, prompts, longest, stop_ids=[self.tok.eot_id]
        )
        return [self.tok.decode(o[:n]) for o, (_, n) in zip(outs, requests, strict=True)]


if __name__ == "__main__":
    main()
