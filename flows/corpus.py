"""The builtin default corpus ``builtin:python-docs``: English text that every Python install carries.

What it is: :func:`materialize` extracts the installed Python's ``pydoc_data.topics`` help topics
and the docstrings of the standard library's modules, classes and functions (read with ``ast``, so
nothing is imported or executed) and writes them as ``.txt`` files under a directory the caller
gives -- one file per help topic and one per module. Output is deterministic for a given Python
install, needs no network, and is written once (a ``DONE`` marker makes later calls free).

What it is not: a general corpus downloader, or part of preprocessing proper -- the files it writes
are ordinary inputs to :func:`flows.preprocess.preprocess`.
"""

from __future__ import annotations

import ast
import logging
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from flows.outputs import atomic_write_text, is_done, mark_done

log = logging.getLogger(__name__)

NAME = "python-docs"
# Test suites hold thousands of near-identical one-line docstrings; site-packages is not the stdlib.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def materialize(dest: str | Path) -> Path:
    """Write the corpus under `dest` (e.g. ``<workdir>/corpus/python-docs``) unless already there."""
    dest = Path(dest)
    if is_done(dest):
        return dest
    if dest.exists():  # a run killed half-way: start over, the files are cheap to redo
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    files = chars = 0
    for name, text in _documents():
        atomic_write_text(dest / f"{name}.txt", text)
        files += 1
        chars += len(text)
    if files == 0:
        raise RuntimeError(f"found no Python documentation to build {NAME} from (stdlib at {_stdlib()})")
    mark_done(dest, {"files": files, "chars": chars, "python": sys.version})
    log.info("wrote builtin corpus %s: %d files, %.1f MB of text", dest, files, chars / 1e6)
    return dest


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _documents() -> Iterator[tuple[str, str]]:
    """(file stem, text) pairs in a fixed order: help topics first, then modules by path."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            yield f"topic-{_safe(key)}", text + "\n"
    root = _stdlib()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        text = _module_text(path, rel)
        if text:
            module = ".".join(rel.with_suffix("").parts)
            yield f"module-{_safe(module)}", text


def _module_text(path: Path, rel: Path) -> str:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(rel))
    except (SyntaxError, ValueError, OSError):  # lib2to3 test data and friends are not valid Python
        return ""
    parts: list[str] = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        parts.append(module_doc)
    # ast.walk is breadth-first and deterministic; qualified names are not needed for prose.
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:  # skip "Return self." style one-liners
                parts.append(f"{node.name}\n\n{doc}")
    return "\n\n".join(parts).strip() + "\n" if parts else ""


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
