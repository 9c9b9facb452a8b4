"""Object storage (s3://, gs://, ...) through fsspec: which driver a URL needs, and a one-line error
when it is not installed.

What it is: the check every place that hands a URL to fsspec (raw inputs) or to Ray Train
(checkpoint storage) makes first, so that a missing driver is a ConfigError naming the URL and the
``pip install`` that fixes it, not fsspec's ImportError traceback from deep inside planning.
The drivers themselves are the ``cloud`` extra (``pip install 'gptflow[cloud]'``: s3fs, gcsfs),
which cluster.yaml installs on every node.

What it is not: credentials handling. Those come from the stores' usual environment variables
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_ENDPOINT_URL``,
``GOOGLE_APPLICATION_CREDENTIALS``, instance roles) and never pass through gptflow's config, logs or
MLflow.
"""

from __future__ import annotations

from flows.config import ConfigError

# protocol -> the package that provides its fsspec driver; the first two are the `cloud` extra.
DRIVERS = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "adl": "adlfs",
    "hf": "huggingface_hub",
}
CLOUD_EXTRA = "pip install 'gptflow[cloud]'"


def protocol(url: str) -> str | None:
    """The URL's scheme ("s3" for s3://bucket/key), or None for a local path."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else None


def require_driver(url: str, shown: str) -> None:
    """ConfigError unless fsspec can load the driver for `url`'s protocol.

    `shown` is how the error names the URL (the caller's key and the URL with credentials redacted).
    """
    import fsspec

    proto = protocol(url)
    if proto is None:
        return
    try:
        fsspec.get_filesystem_class(proto)
    except ImportError as e:
        package = DRIVERS.get(proto)
        fix = (
            f"{CLOUD_EXTRA} (or pip install {package})"
            if package in ("s3fs", "gcsfs")
            else f"pip install {package}"
            if package
            else str(e)
        )
        raise ConfigError(
            f"{shown}: reading {proto}:// needs the fsspec driver {package or '?'}, which is not "
            f"installed: {fix}"
        ) from None
    except ValueError as e:  # fsspec: "Protocol not known"
        raise ConfigError(f"{shown}: unknown storage protocol {proto}:// ({e})") from None
