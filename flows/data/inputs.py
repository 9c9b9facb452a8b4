"""Preprocessing inputs: the user's input specs resolved to files, described, checked and opened.

What it is: everything between input specs (paths, folders, globs, fsspec URLs of ``.txt``/``.md``,
``.jsonl``/``.json``, ``.parquet``, optionally ``.gz``/``.zst``; a Hugging Face ``datasets`` source)
and the list of :class:`InputFile` the stage plans work units from: :func:`resolve_paths` (specs to
files, in input order), :func:`describe` (size and content fingerprint), the checks that fail before
any Ray work (:func:`check_usable`, :func:`check_parquet_field`), :func:`export_hf_dataset`, and
opening an input, local or fsspec, decompressed (:func:`open_input`).

What it is not: planning work units (flows/data/units.py), per-format reading
(flows/data/formats.py), cleaning (flows/data/clean.py), redacting URLs (flows/redact.py), or
Ray scheduling (flows/data/stage.py).
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import logging
import os
import urllib.parse
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flows.config import ConfigError, DataConfig
from flows.data.clean import looks_binary
from flows.object_storage import require_driver
from flows.redact import redact_text, redact_url
from flows.workdir import DONE, FingerprintCache, tmp_suffix

log = logging.getLogger(__name__)

FORMATS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}

COMPRESSIONS = {".gz": "gz", ".zst": "zst"}

BLOCK_BYTES = 4 << 20  # bytes read at a time: bounds memory on any input
_SNIFF = 8192


class InputError(ConfigError):
    """An input the run cannot start from: missing path, unknown format, no usable text."""


@dataclass(frozen=True)
class InputFile:
    """One input file, resolved: where it is, how to read it, and a fingerprint of its content."""

    path: str
    size: int
    fmt: str  # text | jsonl | json | parquet
    compression: str | None  # gz | zst | None
    fingerprint: str


def is_url(spec: str) -> bool:
    return "://" in spec


def classify(path: str) -> tuple[str, str | None] | None:
    """(format, compression) from the file name, or None when the format is not supported."""
    if is_url(path):  # https://host/corpus.txt?X-Amz-Signature=...: the format is the path's
        path = urllib.parse.urlsplit(path).path
    name = path.lower()
    compression = None
    for ext, comp in COMPRESSIONS.items():
        if name.endswith(ext):
            compression, name = comp, name[: -len(ext)]
            break
    for ext, fmt in FORMATS.items():
        if name.endswith(ext):
            if fmt == "parquet" and compression:
                return None  # parquet compresses inside; a .parquet.gz is not readable by row group
            return fmt, compression
    return None


def resolve_paths(specs: tuple[str, ...], key: str, skipped: Counter) -> list[str]:
    """Expand files, folders and globs (local or fsspec) into files in input order.

    Raises InputError naming the spec when one matches nothing. Files in a folder with an
    unsupported suffix are skipped and counted (``unsupported_file``), and so are its hidden files
    (``hidden_file``: a name, or a folder on its path, starting with a dot); an unsupported file
    named directly is an error.
    """
    out: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        found = _expand(spec, key, skipped)
        for path, explicit in found:
            if classify(path) is None:
                if explicit:
                    raise InputError(
                        f"{key}: {redact_url(path)} has an unsupported format; supported: "
                        f"{', '.join(FORMATS)} (optionally {', '.join(COMPRESSIONS)})"
                    )
                skipped["unsupported_file"] += 1
                log.warning("skipping %s: not one of %s", redact_url(path), ", ".join(FORMATS))
                continue
            if path not in seen:  # the same file named twice would only produce duplicates
                seen.add(path)
                out.append(path)
    return out


def _expand(spec: str, key: str, skipped: Counter) -> list[tuple[str, bool]]:
    if is_url(spec):
        require_driver(
            spec, f"{key}: {redact_url(spec)}"
        )  # s3:// without s3fs: one line, not ImportError
        try:
            return _expand_url(spec, key, skipped)
        except InputError:
            raise
        except (
            OSError,
            ValueError,
        ) as e:  # unreachable host, refused credentials, bad URL (fsspec, aiohttp)
            raise InputError(
                f"{key}: cannot list {redact_url(spec)} ({type(e).__name__}: {redact_text(str(e))})"
            ) from e
    if globlib.has_magic(spec):
        matches = sorted(globlib.glob(spec, recursive=True))
        files = []
        for m in matches:
            files += _expand_local(Path(m), explicit=False, skipped=skipped)
        if not files:
            raise InputError(f"{key}: the pattern {spec} matches no files")
        return files
    path = Path(spec)
    if not path.exists():
        raise InputError(f"{key}: {spec} does not exist")
    return _expand_local(path, explicit=True, skipped=skipped)


def _expand_url(spec: str, key: str, skipped: Counter) -> list[tuple[str, bool]]:
    import fsspec

    fs, _, paths = fsspec.get_fs_token_paths(spec)
    files: list[tuple[str, bool]] = []
    for p in sorted(paths):
        if fs.isdir(p):
            root = p.rstrip("/")
            for f in sorted(fs.find(p)):
                if _hidden(f[len(root) :].lstrip("/")):
                    skipped["hidden_file"] += 1
                    continue
                files.append((fs.unstrip_protocol(f), False))
        elif fs.exists(p):
            # unstrip_protocol, not f"{protocol}://{p}": http(s) paths keep their protocol
            files.append((fs.unstrip_protocol(p), not globlib.has_magic(spec)))
    if not files:
        raise InputError(f"{key}: {redact_url(spec)} does not exist or matches no files")
    return files


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/") if part)


def _expand_local(path: Path, explicit: bool, skipped: Counter) -> list[tuple[str, bool]]:
    if not path.is_dir():
        return [(str(path.resolve()), explicit)]
    out = []
    for p in sorted(path.rglob("*")):
        if not p.is_file() or p.name == DONE:  # a stage's DONE marker is bookkeeping, not corpus
            continue
        if _hidden(p.relative_to(path).as_posix()):  # .git, .DS_Store, editor swap files: counted
            skipped["hidden_file"] += 1
            continue
        out.append((str(p.resolve()), False))
    return out


# What identifies a remote file's content, as fsspec's info() names it per store: S3/HTTP ETag and
# Content-MD5/Digest, GCS md5Hash/crc32c/generation, Azure etag/content_md5, version ids. A date
# (mtime, Last-Modified) is not among them: a rewrite within its resolution, or a copy that keeps
# it, would go unnoticed.
_CONTENT_TAGS = (
    "ETag",
    "etag",
    "Content-MD5",
    "Digest",
    "md5Hash",
    "crc32c",
    "content_md5",
    "checksum",
    "sha256",
    "VersionId",
    "version_id",
    "generation",
)


def describe(paths: list[str], cache: FingerprintCache | None = None) -> list[InputFile]:
    """Size and content fingerprint of each file: sha256 locally (through `cache` when given); for a
    URL its size, the store's content tag (ETag, MD5, version id, ...) and a hash of the full URL --
    or, when the store gives no such tag (a plain HTTP server, file://, memory://), the sha256 of
    its content, read once per call (streamed)."""
    out = []
    for path in paths:
        fmt, compression = classify(path)  # type: ignore[misc]  # resolve_paths filtered these
        if is_url(path):
            size, fingerprint = _describe_url(path, cache or FingerprintCache(None))
        else:
            size = os.path.getsize(path)
            fingerprint = f"sha256:{(cache or FingerprintCache(None)).sha256(path)}"
        out.append(InputFile(path, size, fmt, compression, fingerprint))
    return out


def _describe_url(url: str, cache: FingerprintCache) -> tuple[int, str]:
    import fsspec

    # The full URL (credentials and query included: another presigned URL may name other content)
    # enters the fingerprint only hashed; nothing else in it leaves the process unredacted.
    url_hash = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    try:
        fs, _, (p,) = fsspec.get_fs_token_paths(url)
        info = fs.info(p)
        size = int(info.get("size") or 0)
        tag = next((str(info[k]) for k in _CONTENT_TAGS if info.get(k)), None)
        if tag is not None:
            return size, f"size={size};tag={tag};url={url_hash}"
        if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            return (
                size,
                f"sha256:{cache.sha256(p)};url={url_hash}",
            )  # file://: hashed once, then by stat
        log.info(
            "%s: no ETag, checksum or version id; fingerprinting it by its content", redact_url(url)
        )
        h = hashlib.sha256()
        with fs.open(p, "rb") as f:
            while block := f.read(BLOCK_BYTES):
                h.update(block)
    except (OSError, ValueError) as e:
        raise InputError(
            f"{redact_url(url)}: cannot read it ({type(e).__name__}: {redact_text(str(e))})"
        ) from e
    return size, f"sha256:{h.hexdigest()};url={url_hash}"


def check_usable(files: list[InputFile], key: str) -> None:
    """Fail before any Ray work when no file can hold text (all empty or all binary)."""
    if not files:
        raise InputError(f"{key}: no input files")
    if all(f.size == 0 for f in files):
        raise InputError(
            f"{key}: every input file is empty ({len(files)} files, e.g. {files[0].path})"
        )
    for f in files:
        if f.size == 0:
            continue
        if f.fmt == "parquet":
            return
        try:
            with open_input(f) as fh:
                head = fh.read(_SNIFF)
        except (
            OSError,
            *TRUNCATED_ERRORS,
        ):  # a corrupt archive here is counted when its unit is read
            continue
        if head and not looks_binary(head):
            return
    raise InputError(
        f"{key}: no usable text: every non-empty input looks binary (e.g. {files[0].path})"
    )


def read_head(f: InputFile) -> bytes | None:
    """The first bytes of the (decompressed) file, or None when a broken archive hides them."""
    try:
        with open_input(f) as fh:
            return fh.read(_SNIFF)
    except TRUNCATED_ERRORS:
        return None


def check_parquet_field(files: list[InputFile], text_field: str, key: str) -> None:
    """A parquet file without the text column is a config error, raised before any Ray work."""
    import pyarrow.parquet as pq

    for f in files:
        if f.fmt != "parquet":
            continue
        with open_raw(f.path) as fh:
            names = pq.ParquetFile(fh).schema_arrow.names
        if text_field not in names:
            raise InputError(
                f"{key}: {f.path} has no column {text_field!r} (columns: {', '.join(names)}); "
                "set data.text_field"
            )


def open_raw(path: str) -> IO[bytes]:
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def open_input(f: InputFile) -> IO[bytes]:
    """A binary stream of the file's (decompressed) content."""
    raw = open_raw(f.path)
    if f.compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if f.compression == "zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=True
        )
    return raw


def export_hf_dataset(data: DataConfig, cache_dir: Path) -> InputFile:
    """Load ``data.hf_dataset`` with the `datasets` library and write its text column as parquet.

    A local ``save_to_disk`` directory is opened with ``load_from_disk``; anything else goes to
    ``load_dataset`` (a hub name on a cluster, or a builder such as ``json`` with
    ``hf_data_files``). The parquet copy, named by the dataset's fingerprint, is then an ordinary
    input planned by row group, so workers on any node read it from the (shared) workdir.
    """
    import datasets

    source = data.hf_dataset or ""
    try:
        local = Path(source)
        saved = ("dataset_info.json", "dataset_dict.json", "state.json")
        if local.is_dir() and any((local / name).exists() for name in saved):
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(
                source,
                data.hf_config,
                split=data.hf_split,
                data_files=list(data.hf_data_files) or None,
            )
    except (
        Exception
    ) as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise InputError(
            f"data.hf_dataset={source!r}: cannot load it with `datasets` ({type(e).__name__}: {e})"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        if data.hf_split not in ds:
            raise InputError(
                f"data.hf_split={data.hf_split!r}: {source} has splits {', '.join(ds)}"
            )
        ds = ds[data.hf_split]
    if data.text_field not in ds.column_names:
        raise InputError(
            f"data.text_field={data.text_field!r}: {source} has columns "
            f"{', '.join(ds.column_names)}"
        )
    fingerprint = f"hf:{ds._fingerprint}"
    path = cache_dir / f"{ds._fingerprint}.parquet"
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".{path.name}.{tmp_suffix()}"
        ds.select_columns([data.text_field]).to_parquet(str(tmp), batch_size=10_000)
        os.replace(tmp, path)
    return InputFile(str(path), path.stat().st_size, "parquet", None, fingerprint)


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [EOFError, zlib.error, gzip.BadGzipFile]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


TRUNCATED_ERRORS = _decompress_errors()
