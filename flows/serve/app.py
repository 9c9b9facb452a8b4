"""The Ray Serve deployment: OpenAI's completions and chat API over gptcore's continuous batching.

`GPTServer` is a FastAPI-ingress deployment. Each replica loads the model (NAME@ALIAS from the
registry, or a bundle directory), runs one continuous-batching decode loop (runner.py) and answers
``POST /v1/completions``, ``POST /v1/chat/completions`` (plain JSON or server-sent events),
``GET /v1/models``, ``GET /healthz`` and the playground page at ``GET /``. This file holds the
routes and what one request does; the rest sits beside it: the API key (auth.py), metrics and the
end-of-run summary (metrics.py), which model serves now and the swap when the alias moves
(hotswap.py), the decode loop (runner.py), request checking and response shapes (protocol.py).

Every failure a client can cause is a 4xx in OpenAI's error JSON, never a 500 or a dead replica.
deploy.py binds it (``gptflow serve``, ``serve run flows.serve.deploy:app``, ``serve deploy``).
"""

# No `from __future__ import annotations`: FastAPI reads the route parameters' annotations at
# runtime.
import asyncio
import html
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from flows.serve import auth, protocol
from flows.serve.hotswap import HotSwap, LeasedStream
from flows.serve.metrics import ServeMetrics, summary
from flows.serve.models import Loaded, ServeSettings
from flows.serve.protocol import APIError, Generation

log = logging.getLogger("gptflow.serve")

api = FastAPI(title="gptflow", docs_url=None, redoc_url=None)
api.add_middleware(auth.RequireKey)
CHAT_TURN_STOPS = ("\nuser: ", "\nsystem: ")  # the chat format's next turns: the answer is over


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error(
        APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind)
    )


@serve.deployment(name="gptflow")
@serve.ingress(api)
class GPTServer:
    def __init__(self, settings: ServeSettings):
        from flows.redact import redact_logs

        logging.basicConfig(level=logging.INFO)
        redact_logs()  # a replica's log reaches files and the dashboard: no credentials in it
        self.settings = settings
        self.cfg = settings.serve
        self._started = time.time()
        auth.set_replica_key(settings.api_key_sha256)
        self.metrics = ServeMetrics()
        self.swap = HotSwap(settings)

    @property
    def current(self) -> Loaded:
        """The model serving new requests now."""
        return self.swap.current

    # ------------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 while the decode loop lives and keeps stepping; 503 when it died or is wedged (has
        had work without finishing a step for serve.stall_s). A registry that cannot be read is
        reported but is not a failure: the replica keeps serving the version it has."""
        loaded = self.current
        runner = loaded.runner
        engine, stats = runner.engine, runner.stats
        stalled = runner.stalled_s()
        problem = None
        if not runner.alive:
            problem = "the decode loop has stopped"
        elif stalled > self.cfg.stall_s:
            problem = (
                f"the decode loop has had work but no finished step for {stalled:.0f} s "
                f"(stall_s={self.cfg.stall_s})"
            )
        body = {
            "status": "ok" if problem is None else "unhealthy",
            "model": self.settings.served_name,
            "version": loaded.version,
            "running": engine.running,
            "waiting": engine.waiting,
            "requests": stats.requests,
            "cancelled": stats.cancelled,
            "rejected": stats.rejected,
            "refused_versions": sorted(self.swap.refused),
            "last_step_age_s": round(time.time() - runner.last_step, 3),
            "leases": self.swap.leases(),
            "registry": self.swap.registry_problem or "ok",
        }
        if problem:
            body["problem"] = problem
        return JSONResponse(body, status_code=200 if problem is None else 503)

    @api.get("/")
    async def playground(self) -> HTMLResponse:
        page = (
            resources.files("flows.serve").joinpath("playground.html").read_text(encoding="utf-8")
        )
        return HTMLResponse(page.replace("{{MODEL}}", html.escape(self.settings.served_name)))

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        loaded = self.current
        card = {
            "id": self.settings.served_name,
            "object": "model",
            "created": int(self._started),
            "owned_by": "gptflow",
            "version": loaded.version,
            "source": self.swap.describe(loaded),
            "context_length": loaded.limits.context_length,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, chat=True)

    def stats(self) -> dict[str, Any]:
        """Totals and percentiles of this replica, for the summary `gptflow serve` logs at the
        end."""
        loaded = self.current
        return summary(loaded.runner.stats, loaded.version, self.swap.swaps, self._started)

    def auth_required(self) -> bool:
        """Whether this app asks for an API key (a redeploy reads it so as never to turn auth
        off)."""
        return self.settings.api_key_sha256 is not None

    # ------------------------------------------------------------------ one request

    async def _handle(self, request: Request, chat: bool) -> Response:
        route = "chat" if chat else "completions"
        start = time.perf_counter()
        loaded = None
        try:
            body = await self._body(request)
            loaded = self.swap.lease()
            body, facts = self._ground(body, loaded) if chat else (body, None)
            if chat:  # the model's own chat template where it has one
                template = (
                    loaded.tokenizer if getattr(loaded.tokenizer, "chat_template", None) else None
                )
                gen = protocol.parse_chat(body, loaded.limits, template)
            else:
                gen = protocol.parse_completion(body, loaded.limits)
            if gen.model is not None and gen.model not in self._names():
                raise APIError(
                    404,
                    f"model {gen.model!r} does not exist here; this server serves "
                    f"{self.settings.served_name!r}",
                    type="not_found_error",
                    param="model",
                    code="model_not_found",
                )
            # Off the event loop: tokenizing long prompts must not stall every other client's
            # stream.
            sequences = await asyncio.to_thread(self._sequences, gen, loaded)
            loaded.runner.check_capacity(len(sequences))
            if gen.stream:
                leased = loaded
                stream = LeasedStream(
                    self._stream(gen, loaded, sequences, start, route, facts),
                    lambda: self.swap.release(leased),
                )
                loaded = (
                    None  # the stream releases the lease when it ends (or is dropped unstarted)
                )
                return StreamingResponse(
                    stream,
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            try:
                result = await asyncio.wait_for(
                    self._collect(gen, loaded, sequences), self.cfg.request_timeout_s
                )
            except TimeoutError:
                raise APIError(
                    504,
                    f"generation took longer than request_timeout_s={self.cfg.request_timeout_s}",
                    type="timeout_error",
                    code="timeout",
                ) from None
            self._record(route, 200, start, result["usage"]["completion_tokens"])
            if facts is not None:
                result["knowledge"] = {"facts": facts}  # which rows grounded the answer
            return JSONResponse(result)
        except APIError as e:
            self._record(route, e.status, start, 0)
            return _error(e)
        except Exception:  # a bug: answer it, keep the replica; the detail goes to the log only
            log.exception("%s failed", route)
            self._record(route, 500, start, 0)
            return _error(
                APIError(500, "internal error (logged on the server)", type="server_error")
            )
        finally:
            if loaded is not None:
                self.swap.release(loaded)

    def _ground(self, body: Any, loaded: Loaded) -> tuple[Any, list[dict[str, Any]] | None]:
        """serve.knowledge: the facts that match the last user turn, put before the conversation."""
        if (
            loaded.grounder is None
            or not isinstance(body, dict)
            or not isinstance(body.get("messages"), list)
        ):
            return body, None
        from flows.serve.grounding import ground_messages

        messages, facts = ground_messages(
            body["messages"], loaded.grounder, self.cfg.knowledge_top_k
        )
        return {**body, "messages": messages}, facts

    async def _body(self, request: Request) -> Any:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes is over the limit of {limit}")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
        if not text.strip():
            raise APIError(400, "the request body is empty; send a JSON object")

        def no_constants(name: str) -> None:
            raise ValueError(f"{name} is not a number JSON allows")

        try:
            return json.loads(text, parse_constant=no_constants)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def _names(self) -> set[str]:
        s = self.settings
        names = {s.served_name}
        if s.registry_name:
            names |= {s.registry_name, f"{s.registry_name}@{s.alias}"}
        return names

    def _sequences(self, gen: Generation, loaded: Loaded) -> list[dict[str, Any]]:
        """The engine's sequences for a request: n per prompt, in OpenAI's choice order."""
        limits, tok = loaded.limits, loaded.tokenizer
        # A templated chat ends at the model's end-of-turn token (stop_ids); gptflow's own format at
        # a next turn.
        stops = gen.sampling.stop_strings + (
            CHAT_TURN_STOPS if gen.chat and not gen.templated else ()
        )
        sampling = replace(gen.sampling, stop_ids=loaded.stop_ids, stop_strings=stops)
        seed = sampling.seed
        out = []
        for i, prompt in enumerate(gen.prompts):
            ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
            where = "messages" if gen.chat else "prompt"
            if not ids:
                raise protocol.invalid(where, f"{where} {i} encodes to no tokens")
            if len(ids) > limits.max_prompt_tokens:
                raise protocol.invalid(
                    where,
                    f"{where} {i} has {len(ids)} tokens; this server accepts at most "
                    f"{limits.max_prompt_tokens}",
                )
            room = limits.context_length - len(ids)
            max_tokens = (
                gen.max_tokens
                if gen.max_tokens is not None
                else min(protocol.DEFAULT_MAX_TOKENS, room)
            )
            if max_tokens > room:
                raise protocol.invalid(
                    "max_tokens",
                    f"this model's context length is {limits.context_length} "
                    f"tokens; {where} {i} has {len(ids)}, so max_tokens can be at most {room} "
                    f"(asked: {max_tokens})",
                )
            for j in range(gen.n):
                out.append(
                    {
                        "prompt": tuple(ids),
                        "max_new_tokens": max_tokens,
                        "logprobs": gen.logprobs,
                        "sampling": sampling if seed is None else replace(sampling, seed=seed + j),
                    }
                )
        return out

    async def _collect(
        self, gen: Generation, loaded: Loaded, sequences: list[dict[str, Any]]
    ) -> dict[str, Any]:
        ids: list[list[int]] = [[] for _ in sequences]
        lps: list[list] = [[] for _ in sequences]
        finish: list[str | None] = [None] * len(sequences)
        prompt_tokens = [len(s["prompt"]) for s in sequences[:: gen.n]]
        async for i, out in loaded.runner.generate(sequences, stream=False):
            ids[i] += out.tokens
            lps[i] += out.logprobs or []
            if out.finish_reason:
                finish[i] = out.finish_reason
        choices = []
        for i in range(len(sequences)):
            choice = {
                "index": i,
                "text": loaded.tokenizer.decode(ids[i]),
                "finish_reason": finish[i],
            }
            if gen.logprobs is not None:
                choice["logprobs"] = self._logprobs(gen, loaded, lps[i])
            choices.append(choice)
        usage = protocol.usage(sum(prompt_tokens), sum(len(x) for x in ids))
        return protocol.response(gen, self.settings.served_name, choices, usage)

    async def _stream(
        self,
        gen: Generation,
        loaded: Loaded,
        sequences: list[dict[str, Any]],
        start: float,
        route: str,
        facts: list[dict[str, Any]] | None = None,
    ) -> AsyncIterator[str]:
        model, tok = self.settings.served_name, loaded.tokenizer
        ids: list[list[int]] = [[] for _ in sequences]
        sent = [""] * len(sequences)
        total = 0
        status = 200
        ttft = None
        deadline = start + self.cfg.request_timeout_s
        events = loaded.runner.generate(sequences)
        try:
            if gen.chat:
                for i in range(len(sequences)):
                    first = protocol.chunk(gen, model, i, None, None, first=True)
                    yield _sse(first if facts is None else {**first, "knowledge": {"facts": facts}})
            while True:
                try:
                    i, out = await asyncio.wait_for(
                        events.__anext__(), max(deadline - time.perf_counter(), 0.001)
                    )
                except StopAsyncIteration:
                    break
                ids[i] += out.tokens
                total += len(out.tokens)
                text = tok.decode(ids[i])
                if out.finish_reason is None and text.endswith("\ufffd"):
                    continue  # a character split across tokens: wait for the rest of its bytes
                delta, sent[i] = text[len(sent[i]) :], text
                if delta and ttft is None:
                    ttft = time.perf_counter() - start
                logprobs = self._logprobs(gen, loaded, out.logprobs) if out.logprobs else None
                reason = (
                    None
                    if out.finish_reason is None
                    else ("length" if out.finish_reason == "length" else "stop")
                )
                if delta or reason or logprobs:
                    yield _sse(protocol.chunk(gen, model, i, delta, reason, logprobs))
            if gen.include_usage:
                prompt_tokens = sum(len(s["prompt"]) for s in sequences[:: gen.n])
                yield _sse(protocol.usage_chunk(gen, model, protocol.usage(prompt_tokens, total)))
            yield "data: [DONE]\n\n"
        except TimeoutError:
            status = 504
            yield _sse(
                APIError(
                    504,
                    f"generation took longer than request_timeout_s={self.cfg.request_timeout_s}",
                    type="timeout_error",
                    code="timeout",
                ).body()
            )
        except APIError as e:
            status = e.status
            yield _sse(e.body())
        finally:
            await events.aclose()  # cancels what is still running (client gone, timeout)
            self._record(route, status, start, total, ttft)

    def _logprobs(self, gen: Generation, loaded: Loaded, entries: list) -> dict[str, Any]:
        tok = loaded.tokenizer
        texts = [tok.decode([e.token]) for e in entries]
        values = [e.logprob for e in entries]
        if gen.chat:
            return protocol.chat_logprobs(
                texts, values, [[(tok.decode([t]), v) for t, v in e.top] for e in entries]
            )
        return protocol.completion_logprobs(
            texts, values, [{tok.decode([t]): v for t, v in e.top} for e in entries]
        )

    def _record(
        self, route: str, status: int, start: float, tokens: int, ttft: float | None = None
    ) -> None:
        self.metrics.record(route, status, start, tokens, ttft, self.current.runner.stats)

    def __del__(self) -> None:
        swap = getattr(self, "swap", None)  # None when __init__ failed
        if swap is not None:
            swap.stop()
