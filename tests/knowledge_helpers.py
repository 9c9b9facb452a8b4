"""Knowledge sources for the tests: a real SQLite database built from the chemical elements table
shipped in tests/data/fixtures (public-domain facts), the Turtle file beside it, and configs naming
them."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "data" / "fixtures"
ELEMENTS = FIXTURES / "elements.csv"
CAPITALS = FIXTURES / "capitals.ttl"
QUERY = "SELECT name, symbol, atomic_number FROM elements"
SYMBOL = {
    "text": "The chemical symbol of {name} is {symbol}.",
    "ask": ["What is the chemical symbol of {name}?", "Which symbol stands for {name}?"],
    "answer": "{symbol}",
}
NUMBER = {
    "text": "{name} has atomic number {atomic_number}.",
    "ask": ["What is the atomic number of {name}?", "Which atomic number does {name} have?"],
    "answer": "{atomic_number}",
}
CAPITAL = {
    "text": "The capital of {subject} is {object}.",
    "ask": ["What is the capital of {subject}?", "Which city is the capital of {subject}?"],
    "answer": "{object}",
}


def elements() -> list[dict[str, Any]]:
    return [
        {"atomic_number": int(r["atomic_number"]), "symbol": r["symbol"], "name": r["name"]}
        for r in csv.DictReader(ELEMENTS.open(encoding="utf-8"))
    ]


def make_db(path: Path, rows: list[dict[str, Any]] | None = None) -> Path:
    """A SQLite file with table `elements` (atomic_number, symbol, name)."""
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE elements (atomic_number INTEGER PRIMARY KEY, symbol TEXT, name TEXT)"
    )
    conn.executemany(
        "INSERT INTO elements VALUES (:atomic_number, :symbol, :name)", rows or elements()
    )
    conn.commit()
    conn.close()
    return path


def sql_source(db: Path, templates: tuple[dict, ...] = (SYMBOL,), **kw: Any) -> dict[str, Any]:
    return {"source": f"sqlite:///{db}", "query": QUERY, "templates": list(templates), **kw}


def rdf_source(path: Path = CAPITALS, **kw: Any) -> dict[str, Any]:
    return {
        "source": str(path),
        "predicate": "http://example.org/capital",
        "templates": [CAPITAL],
        **kw,
    }
