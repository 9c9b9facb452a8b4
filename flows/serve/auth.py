"""The API key of a replica: every /v1 route answers 401 without ``Authorization: Bearer <key>``.

The key itself never reaches a replica: ServeSettings carries its SHA-256, which the replica
registers here when it starts (:func:`set_replica_key`) and :class:`RequireKey` compares in
constant time. /healthz and the playground page need no key.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from flows.serve.protocol import APIError

# The key hash of the replica in this process (Serve runs one per process). It lives in this
# module, which the deployment reaches by name (`auth.set_replica_key`), because Serve pickles the
# deployment class by value: a global of app.py written in __init__ would be a copy's.
_REPLICA_KEY: dict[str, str | None] = {"sha256": None}


def set_replica_key(sha256: str | None) -> None:
    """The key this process's replica asks for (None: no key)."""
    _REPLICA_KEY["sha256"] = sha256


def check_key(headers: Headers, want: str | None) -> None:
    """APIError 401 unless the headers carry the bearer key whose SHA-256 is `want`."""
    if want is None:
        return
    scheme, _, key = headers.get("authorization", "").partition(" ")
    given = hashlib.sha256(key.strip().encode()).hexdigest() if scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(given, want):
        raise APIError(
            401,
            "missing or wrong API key: send `Authorization: Bearer <key>`",
            type="authentication_error",
            code="invalid_api_key",
        )


class RequireKey:
    """Every /v1 route -- an unknown one and a wrong method included -- answers 401 without the key.
    ASGI middleware (not BaseHTTPMiddleware, which would buffer streams and hide disconnects)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path, root = scope.get("path", ""), scope.get("root_path", "")
            path = path[len(root) :] if root and path.startswith(root) else path
            if path == "/v1" or path.startswith("/v1/"):
                try:
                    check_key(Headers(scope=scope), _REPLICA_KEY["sha256"])
                except APIError as e:
                    await JSONResponse(e.body(), status_code=e.status, headers=e.headers)(
                        scope, receive, send
                    )
                    return
        await self.app(scope, receive, send)
