"""Knowledge sources read into rows: a database query, an RDF graph, a CSV or JSONL file.

What it is: :func:`read_rows` (a source's columns and rows: a SQLAlchemy URL and one SELECT,
opened read-only; an RDF file read by rdflib, one row per (subject, object) of a predicate; a CSV or
JSONL file), the checks of a source's settings and templates (:func:`kind`,
:func:`check_templates`, :func:`template_fields`, :func:`check_select`), :func:`label` (a source
named without credentials) and :func:`fingerprint`, the sources' content identity (a file's sha256;
for a database the query and a hash of the rows it returns).

What it is not: a writer of any database -- SQL runs in a read-only connection (SQLite ``mode=ro``,
a read-only transaction elsewhere) and only a single SELECT is let through --, nor putting rows
into words (flows/data/knowledge.py).

Bad input raises :class:`InputError` naming the source and the problem (the field, the file, the
statement) before any training starts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import string
import urllib.parse
from pathlib import Path
from typing import Any

from flows.config import DataConfig, KnowledgeSource
from flows.data.inputs import InputError
from flows.redact import redact_url
from flows.workdir import FingerprintCache

RDF_FORMATS = {
    ".nt": "nt",
    ".ttl": "turtle",
    ".n3": "n3",
    ".rdf": "xml",
    ".xml": "xml",
    ".owl": "xml",
}
ROW_FORMATS = (".csv", ".jsonl")
_RDFS_LABEL = "http://www.w3.org/2000/01/rdf-schema#label"


# --------------------------------------------------------------------------- reading rows


def label(src: KnowledgeSource) -> str:
    """How errors, logs and the manifest name a source: without credentials."""
    if "://" in src.source and not src.source.startswith("file://"):
        import sqlalchemy as sa

        try:  # SQLAlchemy's own rendering keeps sqlite:////abs/path intact and hides the password
            shown = sa.engine.make_url(src.source).render_as_string(hide_password=True)
            return (
                redact_url(shown) if "?" in shown else shown
            )  # query parameters may hold secrets too
        except sa.exc.ArgumentError:
            pass
    return redact_url(src.source)


def kind(src: KnowledgeSource, key: str) -> str:
    """sql, rdf or rows; InputError when the source is none of them or misses a setting."""
    check_templates(src, key)
    suffix = Path(
        urllib.parse.urlsplit(src.source).path if "://" in src.source else src.source
    ).suffix.lower()
    if "://" in src.source and not src.source.startswith("file://"):
        found = "sql"
    elif suffix in RDF_FORMATS:
        found = "rdf"
    elif suffix in ROW_FORMATS:
        found = "rows"
    else:
        raise InputError(
            f"{key}.source: {label(src)} is neither a database URL (sqlite:///file.db, "
            f"postgresql://...) nor an RDF file ({', '.join(RDF_FORMATS)}) nor a row file "
            f"({', '.join(ROW_FORMATS)})"
        )
    if found == "sql" and not src.query:
        raise InputError(f"{key}.query: {label(src)} is a database: give one SELECT statement")
    if found == "rdf" and not src.predicate:
        raise InputError(
            f"{key}.predicate: {label(src)} is an RDF graph: give the predicate IRI to read"
        )
    if found != "sql" and src.query:
        raise InputError(f"{key}.query: {label(src)} is a file, not a database: remove the query")
    if found != "rdf" and src.predicate:
        raise InputError(f"{key}.predicate: {label(src)} is not an RDF graph: remove the predicate")
    return found


def check_templates(src: KnowledgeSource, key: str) -> None:
    """A source and templates that can say something: a statement or questions, an answer to
    questions."""
    if not src.source:
        raise InputError(f"{key}.source: missing: give a database URL or a file path")
    if not src.templates:
        raise InputError(
            f"{key}.templates: missing: give at least one template (text, ask, answer)"
        )
    for j, t in enumerate(src.templates):
        where = f"{key}.templates[{j}]"
        if not t.text and not t.ask:
            raise InputError(f"{where}: give a statement (text) or questions (ask), or both")
        if t.ask and not t.answer:
            raise InputError(
                f"{where}.answer: missing: questions (ask) need the answer they expect"
            )
        if not all(q.strip() for q in t.ask):
            raise InputError(f"{where}.ask: an empty question")


def _local(src: KnowledgeSource, key: str) -> Path:
    path = Path(src.source.removeprefix("file://"))
    if not path.is_file():
        raise InputError(f"{key}.source: {src.source} does not exist")
    return path


def check_select(query: str, where: str) -> None:
    """Refuse anything but one SELECT statement (a WITH ... SELECT counts), before it runs."""
    import sqlparse

    statements = [s for s in sqlparse.split(query) if s.strip().strip(";").strip()]
    if len(statements) != 1:
        raise InputError(
            f"{where}: {len(statements)} SQL statements in {query!r}; give exactly one SELECT"
        )
    kind_ = sqlparse.parse(statements[0])[0].get_type()
    if kind_ != "SELECT":
        raise InputError(
            f"{where}: {statements[0].strip()!r} is a {kind_.lower()} statement, not a SELECT; "
            "knowledge sources are only read"
        )


def _sql_rows(src: KnowledgeSource, key: str) -> tuple[list[str], list[dict[str, Any]]]:
    import sqlalchemy as sa

    where = f"{key} ({label(src)})"
    check_select(src.query, f"{key}.query")
    try:
        url = sa.engine.make_url(src.source)
    except sa.exc.ArgumentError as e:
        raise InputError(f"{where}: not a database URL: {e}") from e
    engine = _read_only_engine(url, where)
    try:
        with engine.connect() as conn:
            if url.get_backend_name() in ("postgresql", "mysql", "mariadb"):
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            result = conn.exec_driver_sql(src.query)
            columns = list(result.keys())
            rows = [dict(zip(columns, r, strict=True)) for r in result]
            conn.rollback()  # nothing to keep: the transaction only read
    except sa.exc.DBAPIError as e:
        message = str(e.orig).splitlines()[0] if e.orig is not None else str(e)
        raise InputError(f"{where}: {message} (running {src.query!r})") from e
    except sa.exc.SQLAlchemyError as e:
        raise InputError(f"{where}: {str(e).splitlines()[0]}") from e
    finally:
        engine.dispose()
    return columns, rows


def _read_only_engine(url: Any, where: str) -> Any:
    """An engine whose connections cannot write: SQLite opened with ``mode=ro`` (and query_only),
    other databases in a read-only transaction (set per connection by the caller)."""
    import sqlite3

    import sqlalchemy as sa

    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        if not url.database or url.database == ":memory:":
            raise InputError(
                f"{where}: an in-memory SQLite database holds no knowledge; name a file"
            )
        if not path.is_file():
            raise InputError(f"{where}: cannot open the database: {path} does not exist")

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(
                f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro", uri=True
            )
            conn.execute("PRAGMA query_only = ON")
            return conn

        return sa.create_engine("sqlite://", creator=connect, poolclass=sa.pool.NullPool)
    try:
        return sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args=_timeout(url))
    except ModuleNotFoundError as e:
        raise InputError(
            f"{where}: no driver for {url.drivername} is installed ({e.name}); install it"
        ) from e
    except sa.exc.ArgumentError as e:
        raise InputError(f"{where}: {e}") from e


def _timeout(url: Any) -> dict[str, Any]:
    """Connect timeouts, so that an unreachable host fails in seconds, not minutes."""
    return (
        {"connect_timeout": 10}
        if url.get_backend_name() in ("postgresql", "mysql", "mariadb")
        else {}
    )


def _rdf_rows(src: KnowledgeSource, key: str) -> tuple[list[str], list[dict[str, Any]]]:
    import rdflib

    path = _local(src, key)
    graph = rdflib.Graph()
    try:
        graph.parse(str(path), format=RDF_FORMATS[path.suffix.lower()])
    except Exception as e:  # rdflib raises many parser types (BadSyntax, SAXParseException, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"{key}.source: {path} does not parse as {RDF_FORMATS[path.suffix.lower()]} RDF: "
            f"{first[:300]}"
        ) from e
    predicate = rdflib.URIRef(src.predicate)
    triples = sorted(graph.subject_objects(predicate))
    if not triples:
        present = sorted({str(p) for p in graph.predicates()})[:5]
        raise InputError(
            f"{key}.predicate: {src.predicate} has no triples in {path} "
            f"(predicates there include: {', '.join(present) or 'none'})"
        )
    label_of = rdflib.URIRef(_RDFS_LABEL)

    def name(node: Any) -> str:
        if isinstance(node, rdflib.Literal):
            return str(node)
        found = graph.value(node, label_of)
        if found is not None:
            return str(found)
        text = str(node)
        return text.rstrip("/#").rsplit("#", 1)[-1].rsplit("/", 1)[-1]

    rows = [
        {"subject": name(s), "object": name(o), "subject_iri": str(s), "object_iri": str(o)}
        for s, o in triples
    ]
    return ["subject", "object", "subject_iri", "object_iri"], rows


def _file_rows(src: KnowledgeSource, key: str) -> tuple[list[str], list[dict[str, Any]]]:
    path = _local(src, key)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{key}.source: {path} is not UTF-8 text (byte {e.start})") from e
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        columns = list(reader.fieldnames or [])
        # CSV has no NULL: an empty cell is one.
        return columns, [
            {k: (v if v != "" else None) for k, v in r.items() if k is not None} for r in reader
        ]
    columns: list[str] = []
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{key}.source: {path} line {n} is not JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise InputError(f"{key}.source: {path} line {n} is not a JSON object")
        columns += [k for k in record if k not in columns]
        rows.append(record)
    return columns, rows


def read_rows(src: KnowledgeSource, key: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The source's columns and rows; InputError naming `key` and the source when it cannot be
    read."""
    found = kind(src, key)
    columns, rows = {"sql": _sql_rows, "rdf": _rdf_rows, "rows": _file_rows}[found](src, key)
    fields = template_fields(src)
    missing = sorted(fields - set(columns))
    if missing:
        raise InputError(
            f"{key}.templates: field {{{missing[0]}}} is not a column of {label(src)} "
            f"(it returns: {', '.join(columns) or 'no columns'})"
        )
    return columns, rows


def template_fields(src: KnowledgeSource) -> set[str]:
    """Every {field} the source's templates name."""
    fields: set[str] = set()
    for t in src.templates:
        for text in (t.text, t.answer, *t.ask):
            try:
                fields |= {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
            except ValueError as e:  # an unbalanced brace
                raise InputError(
                    f"{label(src)}: template {text!r}: {e} (write {{{{ and }}}} for braces)"
                ) from e
    empty = "" in fields
    if empty:
        raise InputError(
            f"{label(src)}: a template has an empty {{}}: name the field, e.g. {{name}}"
        )
    return fields


# --------------------------------------------------------------------------- identity


def row_hash(row: dict[str, Any]) -> str:
    """A stable hash of a row's content (column names and values), independent of its position."""
    blob = json.dumps(row, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=16).hexdigest()


def _rows_digest(rows: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for r in (
        rows
    ):  # in the order the query returned them: ORDER BY changes nothing else, but is content too
        h.update(row_hash(r).encode())
    return h.hexdigest()


def fingerprint(data: DataConfig, cache: FingerprintCache) -> list[dict[str, Any]]:
    """Content identity of every knowledge source: a file's sha256; for a database the query and a
    hash of the rows it returns now (the URL enters only hashed: it may hold a password)."""
    out = []
    for i, src in enumerate(data.knowledge):
        key = f"data.knowledge[{i}]"
        if kind(src, key) == "sql":
            _, rows = _sql_rows(src, key)
            out.append(
                {
                    "database": hashlib.sha256(src.source.encode()).hexdigest()[:16],
                    "query": src.query,
                    "rows": len(rows),
                    "rows_sha256": _rows_digest(rows),
                }
            )
        else:
            out.append({"file": f"sha256:{cache.sha256(_local(src, key))}"})
    return out
