"""OpenAI's HTTP API, the parts gptflow serves: request checking and response shapes.

Pure functions of JSON values, no Ray and no model: a request body becomes a :class:`Generation`
(what to generate, already checked) or an :class:`APIError` that names the offending parameter
with OpenAI's error JSON and the right 4xx status. What a setting may be is gptcore's
SamplingParams' to say (its errors become 400s naming the parameter); what is checked here is the
JSON (types, OpenAI's ranges and counts) and this server's own limits. Responses and stream chunks
are built here in OpenAI's shapes, so the official `openai` client reads them unmodified.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from flows.data.sft import ROLES, render_chat_prompt
from gptcore.sampling import MAX_STOP_CHARS, SamplingError, SamplingParams

# Parameters OpenAI defines that gptflow accepts at their neutral value only: a client that sends
# the default (the openai client never sends unset ones) works; asking for the feature is a 400.
_NEUTRAL = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": None,
    "best_of": 1,
    "echo": False,
    "suffix": None,
    "user": None,
    "parallel_tool_calls": None,
    "tools": None,
    "tool_choice": None,
    "response_format": None,
    "store": None,
    "metadata": None,
    "service_tier": None,
}
_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "logprobs",
}
COMPLETION_KEYS = _COMMON | {"prompt"}
CHAT_KEYS = _COMMON | {"messages", "top_logprobs", "max_completion_tokens"}
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_STOP = 4
MAX_LOGPROBS = 20


class APIError(Exception):
    """An error response: HTTP status plus OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


@dataclass(frozen=True)
class Limits:
    """What a server accepts (ServeConfig, resolved against the model's context length)."""

    context_length: int
    max_prompt_tokens: int
    max_tokens_limit: int
    max_n: int
    max_prompts: int = 32
    """Prompts in one completions request (each is tokenized and queued: a list of 10,000 filled a
    replica's queue in one request)."""


@dataclass
class Generation:
    """A checked request: prompts as text (or ids), and the decoding settings for each."""

    chat: bool
    prompts: list[str | list[int]]
    max_tokens: int | None  # None: the default, clipped to the room the prompt leaves
    sampling: SamplingParams  # the request's stop strings and seed (choice j samples with seed + j)
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # top-k alternatives per token; None: no logprobs
    model: str | None
    templated: bool = (
        False  # a chat rendered with the model's chat template (its end-of-turn token stops it)
    )
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse_completion(body: Any, limits: Limits) -> Generation:
    body = _object(body, COMPLETION_KEYS)
    if "prompt" not in body:
        raise invalid("prompt", "'prompt' is required")
    prompts = _prompts(body["prompt"])
    if len(prompts) > limits.max_prompts:
        raise invalid(
            "prompt",
            f"{len(prompts)} prompts in one request; this server accepts at most "
            f"{limits.max_prompts}",
        )
    logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
    return _generation(
        body,
        limits,
        chat=False,
        prompts=prompts,
        logprobs=logprobs,
        max_tokens=_int(body, "max_tokens", 1, limits.max_tokens_limit),
    )


def parse_chat(body: Any, limits: Limits, template: Any = None) -> Generation:
    """`template`: a tokenizer whose apply_chat_template renders the messages (the model's own
    format); without one, gptflow's fine-tuning format (flows.data.sft)."""
    body = _object(body, CHAT_KEYS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty list of {role, content} objects")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(
                f"messages[{i}]", f"messages[{i}] must be an object with 'role' and 'content'"
            )
        role, content = m.get("role"), m.get("content")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise invalid(
                f"messages[{i}].role",
                f"messages[{i}].role={role!r} is not one of {', '.join(ROLES)}",
            )
        if isinstance(content, list):  # content parts: text only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise invalid(
                    f"messages[{i}].content",
                    f"messages[{i}].content: only text parts are supported",
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise invalid(f"messages[{i}].content", f"messages[{i}].content must be a string")
        turns.append({"role": role, "content": content})
    if not any(t["content"].strip() for t in turns):
        raise invalid("messages", "every message is empty")
    logprobs = None
    if _bool(body, "logprobs", False):
        logprobs = _int(body, "top_logprobs", 0, MAX_LOGPROBS) or 0
    elif body.get("top_logprobs") is not None:
        raise invalid("top_logprobs", "top_logprobs needs logprobs=true")
    max_tokens = _int(body, "max_completion_tokens", 1, limits.max_tokens_limit)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, limits.max_tokens_limit)
    if template is None:
        prompt = render_chat_prompt(turns)
    else:
        try:
            prompt = template.apply_chat_template(turns, add_generation_prompt=True)
        except ValueError as e:  # the template refused these messages (e.g. roles out of order)
            raise invalid("messages", str(e)) from None
    gen = _generation(
        body, limits, chat=True, prompts=[prompt], logprobs=logprobs, max_tokens=max_tokens
    )
    gen.templated = template is not None
    return gen


def _generation(
    body: dict[str, Any],
    limits: Limits,
    *,
    chat: bool,
    prompts: list[str | list[int]],
    logprobs: int | None,
    max_tokens: int | None,
) -> Generation:
    temperature = _number(body, "temperature", 0.0, 2.0)
    sampling = _sampling(
        temperature=0.0 if temperature is None else temperature,
        top_p=_number(body, "top_p", 0.0, 1.0),
        top_k=_int(body, "top_k", 1, 1 << 20),
        stop_strings=_stop(body.get("stop")),
        seed=_int(body, "seed", -(1 << 63), (1 << 63) - 1),
    )
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options", "stream_options needs stream=true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("stream_options", 'stream_options must be {"include_usage": bool}')
        include_usage = _bool(options, "include_usage", False)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", "'model' must be a string")
    return Generation(
        chat=chat,
        prompts=prompts,
        max_tokens=max_tokens,
        sampling=sampling,
        n=_int(body, "n", 1, limits.max_n) or 1,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        model=model,
    )


_PARAM_OF = {"stop_strings": "stop", "stop_ids": "stop"}  # SamplingParams fields -> API parameters


def _sampling(**settings: Any) -> SamplingParams:
    """The request's SamplingParams; a setting it refuses is a 400 naming the API parameter."""
    try:
        return SamplingParams(**settings)
    except SamplingError as e:
        raise invalid(_PARAM_OF.get(e.field, e.field), str(e)) from None


# --------------------------------------------------------------------------- field checks


def _object(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for key, neutral in _NEUTRAL.items():
        if key in body:
            value = body.pop(key)
            if (
                value is not None
                and value != neutral
                and not (key == "user" and isinstance(value, str))
            ):
                raise invalid(key, f"{key}={value!r} is not supported by this server")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(
            400,
            f"unrecognized request argument: {unknown[0]}",
            param=unknown[0],
            code="unknown_parameter",
        )
    return body


def _prompts(value: Any) -> list[str | list[int]]:
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(_is_int(t) for t in value):
        value = [value]  # one prompt as token ids
    if not isinstance(value, list) or not value:
        raise invalid(
            "prompt", "'prompt' must be a string, a list of strings or a list of token-id lists"
        )
    for i, p in enumerate(value):
        if isinstance(p, str):
            if not p:
                raise invalid("prompt", f"prompt[{i}] is empty")
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            pass
        else:
            raise invalid("prompt", f"prompt[{i}] must be a non-empty string or list of token ids")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise invalid("stop", "'stop' must be a non-empty string or a list of them")
    if len(value) > MAX_STOP:
        raise invalid("stop", f"at most {MAX_STOP} stop sequences")
    longest = max(len(s) for s in value)
    if longest > MAX_STOP_CHARS:
        raise invalid("stop", f"a stop sequence of {longest} characters; at most {MAX_STOP_CHARS}")
    return tuple(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise invalid(key, f"{key}={value!r} must be an integer")
    if not lo <= value <= hi:
        raise invalid(key, f"{key}={value} must be between {lo} and {hi}")
    return value


def _number(body: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(key, f"{key}={value!r} must be a finite number")
    if not lo <= value <= hi:
        raise invalid(key, f"{key}={value} must be between {lo} and {hi}")
    return float(value)


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(key, f"{key}={value!r} must be true or false")
    return value


# --------------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(
    tokens: list[str], logprobs: list[float], top: list[dict[str, float]], offset: int = 0
) -> dict[str, Any]:
    """The legacy completions logprobs object for these tokens' texts."""
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(
    tokens: list[str], logprobs: list[float], top: list[list[tuple[str, float]]]
) -> dict[str, Any]:
    def entry(text: str, lp: float) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            entry(t, lp) | {"top_logprobs": [entry(a, b) for a, b in alts]}
            for t, lp, alts in zip(tokens, logprobs, top, strict=True)
        ]
    }


def response(
    gen: Generation, model: str, choices: list[dict[str, Any]], usage_: dict[str, int]
) -> dict[str, Any]:
    if gen.chat:
        return {
            "id": f"chatcmpl-{gen.id}",
            "object": "chat.completion",
            "created": gen.created,
            "model": model,
            "choices": [
                {
                    "index": c["index"],
                    "message": {"role": "assistant", "content": c["text"]},
                    "logprobs": c.get("logprobs"),
                    "finish_reason": c["finish_reason"],
                }
                for c in choices
            ],
            "usage": usage_,
        }
    return {
        "id": f"cmpl-{gen.id}",
        "object": "text_completion",
        "created": gen.created,
        "model": model,
        "choices": [
            {
                "index": c["index"],
                "text": c["text"],
                "logprobs": c.get("logprobs"),
                "finish_reason": c["finish_reason"],
            }
            for c in choices
        ],
        "usage": usage_,
    }


def chunk(
    gen: Generation,
    model: str,
    index: int,
    text: str | None,
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
    first: bool = False,
) -> dict[str, Any]:
    """One streamed event for choice `index`."""
    if gen.chat:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        return {
            "id": f"chatcmpl-{gen.id}",
            "object": "chat.completion.chunk",
            "created": gen.created,
            "model": model,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
            ],
        }
    return {
        "id": f"cmpl-{gen.id}",
        "object": "text_completion",
        "created": gen.created,
        "model": model,
        "choices": [
            {
                "index": index,
                "text": text or "",
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        ],
    }


def usage_chunk(gen: Generation, model: str, usage_: dict[str, int]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if gen.chat else "text_completion"
    prefix = "chatcmpl" if gen.chat else "cmpl"
    return {
        "id": f"{prefix}-{gen.id}",
        "object": obj,
        "created": gen.created,
        "model": model,
        "choices": [],
        "usage": usage_,
    }
