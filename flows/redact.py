"""Secrets in URLs: what leaves the process names an input without its credentials.

What it is: :func:`redact_url` (user:password and credential-like query parameters become ``***``),
:func:`redact_text` and :func:`redact` (the same for every URL in a message or a JSON-like value),
and :class:`RedactingFilter` with :func:`redact_logs`, which put it on every log handler. Logs,
errors, MLflow params and dataset sources, and the manifest carry these forms; an input's
fingerprint keeps a hash of the full URL (flows/data/inputs.py).

What it is not: access control, or a scanner of document text (PII in the corpus is curation's:
flows/data/curate/pii.py).
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from typing import Any

# Query parameters that carry credentials: API tokens and keys, passwords, presigned-URL signatures
# (S3's X-Amz-*, GCS's X-Goog-*, Azure SAS `sig`, CloudFront `Signature`/`Key-Pair-Id`).
_SECRET_PARAM = re.compile(
    r"token|key|secret|sig|password|passwd|pwd|credential|auth|session|"
    r"^x-amz-|^x-goog-|^awsaccesskeyid$",
    re.IGNORECASE,
)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"`<>]+")  # up to a space or a quote
REDACTED = "***"


def redact_url(url: str) -> str:
    """`url` without its secrets: user:password becomes ``***``, and so does the value of every
    query parameter named like a credential (token, key, secret, signature, password, X-Amz-*, ...).

    What leaves the process (logs, errors, MLflow params and dataset sources, the manifest) carries
    this form; the input's fingerprint keeps a hash of the full URL, so it still changes with it.
    A string that is no URL comes back unchanged.
    """
    if "://" not in url:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unbalanced [ in the host: say nothing of what it holds
        return url.split("://", 1)[0] + "://" + REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = REDACTED + "@" + netloc.rpartition("@")[2]
    query = "&".join(_redact_param(p) for p in parts.query.split("&")) if parts.query else ""
    fragment = (
        REDACTED if parts.fragment and "=" in parts.fragment else parts.fragment
    )  # #access_token=...
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def _redact_param(param: str) -> str:
    name, sep, value = param.partition("=")
    if sep and value and _SECRET_PARAM.search(urllib.parse.unquote_plus(name)):
        return f"{name}={REDACTED}"
    return param


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted (see :func:`redact_url`): for messages and param
    values."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text) if "://" in text else text


def redact(value: Any) -> Any:
    """A JSON-like value (a config as a dict, say) with every URL in its strings redacted."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that redacts URLs in every record a handler emits, third-party ones included
    (fsspec logs each URL it opens at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "://" in message:
            record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:  # a traceback's messages carry URLs too
            import traceback

            record.exc_text = redact_text(
                "".join(traceback.format_exception(*record.exc_info))
            ).rstrip("\n")
        return True


def redact_logs() -> None:
    """Put the RedactingFilter on every handler of the root logger (configuring one when there is
    none): the CLI calls it, and so does every Ray worker (``worker_process_setup_hook``) and serve
    replica, whose logs end up in files and dashboards too."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO)
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
