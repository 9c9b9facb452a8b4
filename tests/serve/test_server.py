"""The server over real HTTP on 127.0.0.1 with a real Ray Serve instance: the official openai client
on both endpoints (plain and streaming), continuous-batching equivalence under concurrent requests,
every kind of bad input, auth, 429 past the queue, client disconnects."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from gptcore import load_bundle
from gptcore.batching import SequenceRequest, generate_alone
from gptcore.sampling import SamplingParams
from tests.serve.conftest import make_bundle, wait_healthy

pytestmark = pytest.mark.slow
KEY = "sk-test-7f3a9c"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tok):
    return make_bundle(tmp_path_factory.mktemp("bundle"), tok, seed=3)


@pytest.fixture(scope="module")
def reference(bundle):
    model, tok, _ = load_bundle(bundle)
    return model, tok


@pytest.fixture(scope="module")
def apps(deploy, bundle, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    return {
        "open": deploy(
            "open",
            work,
            bundle=bundle,
            served_name="tiny",
            max_batch_size=8,
            max_tokens_limit=1000,
            max_body_bytes=65536,
        ),
        "auth": deploy(
            "auth",
            work,
            bundle=bundle,
            served_name="tiny",
            api_key_env="GPTFLOW_TEST_KEY",
            env={"GPTFLOW_TEST_KEY": KEY},
            access_log=True,
        ),
        "tight": deploy(
            "tight",
            work,
            bundle=bundle,
            served_name="tiny",
            max_batch_size=1,
            max_queue=1,
            max_tokens_limit=1000,
        ),
        "hasty": deploy(
            "hasty",
            work,
            bundle=bundle,
            served_name="tiny",
            max_tokens_limit=1000,
            request_timeout_s=0.25,
        ),
    }


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _expected_ids(reference, prompt: str, max_tokens: int) -> list[int]:
    model, tok = reference
    return generate_alone(
        model,
        SequenceRequest(
            0,
            tuple(tok.encode(prompt)),
            max_tokens,
            SamplingParams(stop_ids=frozenset({tok.eot_id})),
        ),
    )


def _expected(reference, prompt: str, max_tokens: int) -> str:
    return reference[1].decode(_expected_ids(reference, prompt, max_tokens))


def test_openai_client_completions_plain_and_streaming(apps, reference):
    client = _client(apps["open"])
    r = client.completions.create(model="tiny", prompt="The cat sat", max_tokens=12)
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.choices[0].text == _expected(reference, "The cat sat", 12)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(reference[1].encode("The cat sat"))
    assert r.usage.completion_tokens == len(_expected_ids(reference, "The cat sat", 12))

    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="The cat sat",
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[
        0
    ].finish_reason

    many = client.completions.create(model="tiny", prompt=["A dog", "My friend"], max_tokens=5, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert (
        many.choices[0].text == many.choices[1].text == _expected(reference, "A dog", 5)
    )  # greedy: n copies
    assert many.choices[2].text == _expected(reference, "My friend", 5)

    lp = client.completions.create(model="tiny", prompt="The", max_tokens=3, logprobs=2)
    assert len(lp.choices[0].logprobs.token_logprobs) == 3
    assert all(len(t) <= 2 for t in lp.choices[0].logprobs.top_logprobs)


def test_openai_client_chat_plain_and_streaming_uses_the_fine_tuning_chat_format(apps, reference):
    from flows.data.sft import render_chat_prompt

    client = _client(apps["open"])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a cat."},
    ]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    model, tok = reference
    prompt = render_chat_prompt(messages)
    ids = generate_alone(
        model,
        SequenceRequest(
            0,
            tuple(tok.encode(prompt)),
            10,
            SamplingParams(
                stop_ids=frozenset({tok.eot_id}), stop_strings=("\nuser: ", "\nsystem: ")
            ),
        ),
        tok,
    )
    assert r.choices[0].message.content == tok.decode(ids)
    assert r.usage.prompt_tokens == len(tok.encode(prompt))

    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, stream=True
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_sampling_with_a_seed_is_reproducible_and_differs_from_greedy(apps):
    client = _client(apps["open"])
    args = dict(model="tiny", prompt="The cat", max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=11, **args).choices[0].text
    b = client.completions.create(seed=11, **args).choices[0].text
    c = client.completions.create(seed=12, **args).choices[0].text
    greedy = (
        client.completions.create(model="tiny", prompt="The cat", max_tokens=16).choices[0].text
    )
    assert a == b and len({a, c, greedy}) > 1


def test_concurrent_requests_of_different_lengths_each_equal_generate_alone(apps, reference):
    """16 requests at once (more than the 8 batch rows): every output equals generate for it
    alone."""
    client = _client(apps["open"])
    jobs = [(f"The cat {'sat ' * (i % 5)}on", 8 + 17 * i) for i in range(16)]  # 8 .. 263 tokens

    def one(job):
        prompt, max_tokens = job
        if max_tokens % 2:
            return "".join(
                c.choices[0].text
                for c in client.completions.create(
                    model="tiny", prompt=prompt, max_tokens=max_tokens, stream=True
                )
            )
        return (
            client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens)
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, jobs))
    for (prompt, max_tokens), text in zip(jobs, got, strict=True):
        assert text == _expected(reference, prompt, max_tokens), (prompt, max_tokens)


def _post(url: str, body: bytes | str, headers: dict | None = None) -> tuple[int, dict, dict]:
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}


BAD = [
    ("completions", "{", 400, None, "not valid JSON"),
    ("completions", "[1, 2]", 400, None, "JSON object"),
    ("completions", "", 400, None, "empty"),
    ("completions", '{"prompt": "a", "temperature": NaN}', 400, None, "NaN"),
    ("completions", b'{"prompt": "\xff\xfe"}', 400, None, "UTF-8"),
    ("completions", {"max_tokens": 4}, 400, "prompt", "required"),
    ("completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("completions", {"prompt": []}, 400, "prompt", "prompt"),
    ("completions", {"prompt": 5}, 400, "prompt", "prompt"),
    ("completions", {"prompt": "a", "max_tokens": "10"}, 400, "max_tokens", "integer"),
    ("completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens", "between"),
    ("completions", {"prompt": "a", "max_tokens": 10**12}, 400, "max_tokens", "between"),
    (
        "completions",
        {"prompt": "word " * 100, "max_tokens": 1000},
        400,
        "max_tokens",
        "context length",
    ),
    ("completions", {"prompt": "a", "n": 0}, 400, "n", "between"),
    ("completions", {"prompt": "a", "n": 1000}, 400, "n", "between"),
    ("completions", {"prompt": "a", "temperature": -1}, 400, "temperature", "between"),
    ("completions", {"prompt": "a", "temperature": "hot"}, 400, "temperature", "number"),
    ("completions", {"prompt": "a", "top_p": 0}, 400, "top_p", "> 0"),
    ("completions", {"prompt": "a", "logprobs": 99}, 400, "logprobs", "between"),
    ("completions", {"prompt": "a", "stream": "yes"}, 400, "stream", "true or false"),
    ("completions", {"prompt": "a", "stop": ["x"] * 5}, 400, "stop", "at most"),
    ("completions", {"prompt": "a", "stop": 3}, 400, "stop", "stop"),
    # hostile stop strings (four of 240 K characters with n=8 once cost ~24 s per decode step; this
    # app's body limit is 64 KiB)
    (
        "completions",
        {"prompt": "a", "n": 8, "stop": ["ab" * 7_500] * 4},
        400,
        "stop",
        "at most 256",
    ),
    ("completions", {"prompt": "a", "stop": ["x" * 257]}, 400, "stop", "at most 256"),
    ("completions", {"prompt": ["a"] * 10_000}, 400, "prompt", "at most 32"),
    (
        "completions",
        {"prompt": "a", "presence_penalty": 1.5},
        400,
        "presence_penalty",
        "not supported",
    ),
    ("completions", {"prompt": "a", "frobnicate": 1}, 400, "frobnicate", "unrecognized"),
    ("completions", {"prompt": "a", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("completions", {"prompt": "word " * 1100}, 400, "prompt", "at most"),
    ("completions", {"prompt": [[1, 2, 99999]]}, 400, "prompt", "vocabulary"),
    (
        "completions",
        {"prompt": "a", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        "stream",
    ),
    ("completions", {"prompt": "x" * 70000}, 413, None, "limit"),
    ("chat/completions", {"messages": []}, 400, "messages", "non-empty"),
    ("chat/completions", {"messages": "hi"}, 400, "messages", "non-empty"),
    (
        "chat/completions",
        {"messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "messages[0].role",
        "wizard",
    ),
    ("chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content", "string"),
    ("chat/completions", {"messages": [{"role": "user", "content": ""}]}, 400, "messages", "empty"),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        400,
        "top_logprobs",
        "logprobs",
    ),
]


@pytest.mark.parametrize(
    ("route", "body", "status", "param", "words"),
    BAD,
    ids=[f"{i}-{b[0]}-{b[4]}" for i, b in enumerate(BAD)],
)
def test_bad_input_is_a_clear_4xx_in_openai_error_json(apps, route, body, status, param, words):
    raw = body if isinstance(body, str | bytes) else json.dumps(body)
    got, payload, _ = _post(f"{apps['open']}/v1/{route}", raw)
    assert got == status, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words.lower() in error["message"].lower()
    assert error["param"] == param


def test_after_every_bad_input_the_replica_still_serves(apps, reference):
    for route, body, *_ in BAD[:8]:
        _post(
            f"{apps['open']}/v1/{route}",
            body if isinstance(body, str | bytes) else json.dumps(body),
        )
    health = wait_healthy(apps["open"], seconds=5)
    assert health["status"] == "ok"
    r = _client(apps["open"]).completions.create(model="tiny", prompt="The", max_tokens=4)
    assert r.choices[0].text == _expected(reference, "The", 4)


def test_openai_client_raises_its_own_error_types(apps):
    client = _client(apps["open"])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="a", max_tokens=-5)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a")


def test_api_key_is_required_when_configured(apps):
    url = apps["auth"]
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="wrong").completions.create(model="tiny", prompt="a", max_tokens=2)
    status, payload, _ = _post(f"{url}/v1/completions", json.dumps({"prompt": "a"}))
    assert status == 401 and payload["error"]["type"] == "authentication_error"
    status, _, _ = _post(
        f"{url}/v1/completions",
        json.dumps({"prompt": "a", "max_tokens": 2}),
        {"Authorization": f"Bearer {KEY}"},
    )
    assert status == 200
    assert _client(url, key=KEY).models.list().data[0].id == "tiny"
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="wrong").models.list()
    assert wait_healthy(url)["status"] == "ok"  # health checks need no key


def test_every_v1_route_answers_401_without_the_key(apps):
    """Every /v1 route of the app -- and an unknown one, and a known one with the wrong method -- is
    behind the key; only /healthz and the playground page are not."""
    from flows.serve.app import api

    url = apps["auth"]
    paths = api.openapi()["paths"]
    routes = sorted(
        (m.upper(), path) for path, ops in paths.items() if path.startswith("/v1") for m in ops
    )
    assert ("POST", "/v1/completions") in routes and ("GET", "/v1/models") in routes
    for method, path in [
        *routes,
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/completions"),
        ("GET", "/v1"),
    ]:
        req = urllib.request.Request(
            f"{url}{path}",
            b"{}" if method == "POST" else None,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(req, timeout=30)
            status, payload = 200, {}
        except urllib.error.HTTPError as e:
            status, payload = e.code, json.loads(e.read())
        assert status == 401 and payload["error"]["type"] == "authentication_error", (
            method,
            path,
            status,
        )
    with urllib.request.urlopen(f"{url}/", timeout=30) as r:
        assert r.status == 200


def test_a_redeploy_without_the_key_is_refused_where_the_running_app_asks_for_one(
    apps, bundle, tmp_path
):
    from flows.config import ConfigError, PipelineConfig, ServeConfig, TrackingConfig
    from flows.serve.deploy import keep_auth, settings_for

    open_settings = settings_for(
        PipelineConfig(
            workdir=str(tmp_path),
            tracking=TrackingConfig(enabled=False),
            serve=ServeConfig(api_key_env="GPTFLOW_TEST_UNSET"),
        ),
        bundle=str(bundle),
    )
    assert open_settings.api_key_sha256 is None
    with pytest.raises(
        ConfigError, match="running app 'auth' requires an API key and GPTFLOW_TEST_UNSET"
    ):
        keep_auth(open_settings, "GPTFLOW_TEST_UNSET", app_name="auth")
    keep_auth(
        open_settings, "GPTFLOW_TEST_UNSET", app_name="open"
    )  # no auth there: nothing to lose


def test_past_the_queue_requests_get_429_with_retry_after(apps, reference):
    """One batch row and one queue place: of 6 long requests at once, at least 4 are refused."""
    url = apps["tight"]
    body = json.dumps({"prompt": "The cat", "max_tokens": 900})
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: _post(f"{url}/v1/completions", body), range(6)))
    statuses = sorted(r[0] for r in results)
    assert statuses.count(429) >= 4 and 200 in statuses, statuses
    refused = next(r for r in results if r[0] == 429)
    assert (
        refused[2].get("retry-after") == "1" and refused[1]["error"]["type"] == "rate_limit_error"
    )
    ok = next(r for r in results if r[0] == 200)
    assert ok[1]["choices"][0]["text"] == _expected(reference, "The cat", 900)


def test_a_client_that_goes_away_cancels_its_generation(apps):
    url = apps["tight"]
    before = wait_healthy(url)["cancelled"]
    req = urllib.request.Request(
        f"{url}/v1/completions",
        json.dumps({"prompt": "The", "max_tokens": 1000, "stream": True}).encode(),
        {"Content-Type": "application/json"},
    )
    resp = urllib.request.urlopen(req, timeout=30)
    assert resp.readline().startswith(b"data: ")
    resp.close()  # the client goes away after the first event
    deadline = time.time() + 20
    while True:
        health = wait_healthy(url)
        if health["cancelled"] > before and health["running"] == 0:
            break
        assert time.time() < deadline, health
        time.sleep(0.2)
    # and the row it held serves the next request
    assert (
        _client(url)
        .completions.create(model="tiny", prompt="a", max_tokens=3)
        .choices[0]
        .finish_reason
    )


def test_a_request_past_the_timeout_ends_with_504_and_frees_its_row(apps):
    url = apps["hasty"]
    status, payload, _ = _post(
        f"{url}/v1/completions", json.dumps({"prompt": "The", "max_tokens": 1000})
    )
    assert status == 504 and payload["error"]["type"] == "timeout_error"
    req = urllib.request.Request(
        f"{url}/v1/completions",
        json.dumps({"prompt": "The", "max_tokens": 1000, "stream": True}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        events = [json.loads(line[6:]) for line in resp if line.startswith(b"data: {")]
    assert events[-1]["error"]["code"] == "timeout"
    deadline = time.time() + 10
    while (health := wait_healthy(url))["running"]:
        assert time.time() < deadline, health
        time.sleep(0.2)
    assert health["cancelled"] >= 2


def test_models_lists_the_served_model_and_unknown_routes_are_openai_404s(apps):
    models = _client(apps["open"]).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    status, payload, _ = _post(f"{apps['open']}/v1/embeddings", json.dumps({"input": "a"}))
    assert status == 404 and payload["error"]["type"] == "not_found_error"


def test_the_access_log_is_written_only_where_the_config_asks_for_it(apps):
    import ray

    _client(apps["open"]).models.list()
    _client(apps["auth"], KEY).models.list()
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"

    def lines(app: str) -> list[str]:
        return [
            line
            for f in logs.glob(f"replica_{app}_*.log")
            for line in f.read_text(errors="replace").splitlines()
            if f"GET /{app}/v1/models 200" in line
        ]

    deadline = time.monotonic() + 30  # replica log files are flushed by their own process
    while not lines("auth") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert lines("auth"), f"no access line for the app that asked for one in {logs}"
    assert not lines("open"), "serve.access_log=false still logged the request"


def test_playground_streams_into_the_page_in_a_headless_browser(apps, reference):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"{apps['open']}/")
        assert "tiny" in driver.title
        driver.find_element(By.ID, "prompt").send_keys("The cat sat")
        tokens = driver.find_element(By.ID, "max_tokens")
        tokens.clear()
        tokens.send_keys("20")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 30).until(
            lambda d: d.find_element(By.ID, "status").text.startswith("done")
        )
        shown = driver.execute_script("return document.getElementById('output').textContent")
        assert shown == _expected(reference, "The cat sat", 20)
    finally:
        driver.quit()


def test_the_replica_counts_what_the_metrics_need(apps):
    from ray import serve

    stats = serve.get_app_handle("open").stats.remote().result(timeout_s=10)
    assert stats["requests"] > 10 and stats["completion_tokens"] > 100
    assert 1 <= stats["mean_batch_occupancy"] <= 8
    assert stats["ttft_p50_s"] > 0 and stats["latency_p50_s"] > 0
