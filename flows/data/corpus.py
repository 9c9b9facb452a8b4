"""The builtin corpora: text and labelled pairs that every Python install carries, offline.

What it is: two materializers, each writing files once under a folder the caller gives (a ``DONE``
marker makes later calls free), deterministic for a given Python install, with no network:

- ``builtin:python-docs`` (:func:`materialize`, pretraining text): the ``pydoc_data.topics`` help
  topics and the docstrings of the standard library's modules, classes and functions, as ``.txt``
  files -- one per help topic and one per module.
- ``builtin:python-sft`` (:func:`materialize_sft`, fine-tuning pairs): ``pairs.jsonl`` with one
  ``{"prompt", "completion"}`` record per public function, method or class of a non-test stdlib
  module whose docstring opens with a usable paragraph. The prompt is the definition's signature in
  this format (parseable Python once the docstring is closed with ``\"\"\"``)::

      # json.decoder.JSONDecoder.decode
      def decode(self, s, _w=WHITESPACE.match):
          \"\"\"

  -- a comment with the dotted name (module path without ``__init__``, then enclosing classes),
  the ``def``/``async def``/``class`` line as ``ast.unparse`` renders it (no decorators), and an
  opened docstring; the completion is the docstring's first paragraph, whitespace-normalised,
  :data:`MIN_COMPLETION_CHARS` to :data:`MAX_COMPLETION_CHARS` long. At most :data:`MAX_SFT_PAIRS`
  pairs (the lowest hashes of their dotted names when there are more), written in module order.

Separation rule (so fine-tuning completions are never scored as pretraining validation text): no
completion of ``python-sft`` occurs in ``python-docs``, as text with whitespace normalised.
``python-docs`` leaves out every docstring or help-topic paragraph equal to a completion (the rest
of that docstring stays), and a candidate pair whose completion still occurs in what is left
(inside a longer paragraph, or in a help topic) is not used. ``python-docs`` is thus about 8%
smaller than the docstrings alone would make it.

Everything is read with ``ast``: nothing is imported or executed. What it is not: a general corpus
downloader, or part of preprocessing proper -- the files are ordinary inputs to
:func:`flows.data.stage.preprocess`.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import re
import shutil
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flows.workdir import DONE, atomic_write_text, cache_dir, is_done, locked, mark_done

log = logging.getLogger(__name__)

NAME = "python-docs"
SFT_NAME = "python-sft"
SFT_FILE = "pairs.jsonl"

MAX_SFT_PAIRS = 2000  # a few minutes of fine-tuning for the tiny model on 2 CPU cores
MIN_COMPLETION_CHARS = 40  # shorter first paragraphs are "Return self." one-liners
MAX_COMPLETION_CHARS = 400
MAX_SIGNATURE_CHARS = 160  # long default values (tables, regexes) make poor prompts

# Test suites hold thousands of near-identical one-line docstrings; site-packages is not the stdlib.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def materialize(dest: str | Path) -> Path:
    """Write ``python-docs`` under `dest` (e.g. ``<workdir>/corpus/python-docs``) unless already
    there."""
    return _write_once(
        Path(dest), NAME, lambda: ((f"{stem}.txt", text) for stem, text in _documents())
    )


def materialize_sft(dest: str | Path) -> Path:
    """Write ``python-sft`` (``pairs.jsonl``) under `dest` unless already there."""

    def files() -> Iterator[tuple[str, str]]:
        pairs = _sft_pairs()
        lines = [
            json.dumps({"prompt": p.prompt, "completion": p.completion}, sort_keys=True)
            for p in pairs
        ]
        yield SFT_FILE, "".join(line + "\n" for line in lines)

    return _write_once(Path(dest), SFT_NAME, files)


def _write_once(dest: Path, name: str, files: Callable[[], Iterator[tuple[str, str]]]) -> Path:
    if is_done(dest):
        return dest
    # Two runs planning at once in one workdir: one writes, the other waits and finds it done
    # (without the lock the second would delete the first's half-written files as "a run killed
    # half-way").
    with locked(dest.parent / f".{dest.name}.lock"):
        if is_done(dest):
            return dest
        shared = _shared(name, files)
        return _write(dest, name, files) if shared is None else _copy(shared, dest)


def _shared(name: str, files: Callable[[], Iterator[tuple[str, str]]]) -> Path | None:
    """The corpus built once per machine in the shared cache (parsing the stdlib costs ~15 s; every
    new workdir would pay it), keyed by the Python install and this file's code. None when the cache
    cannot be written (a read-only home): each workdir then builds its own."""
    install = f"{sys.version}\0{_stdlib()}\0".encode()
    key = hashlib.sha256(install + Path(__file__).read_bytes()).hexdigest()[:16]
    shared = cache_dir() / "corpus" / f"{name}-{key}"
    try:
        with locked(shared.parent / f".{shared.name}.lock"):
            return shared if is_done(shared) else _write(shared, name, files)
    except PermissionError as e:  # OSError beyond that (a full disk) is an error worth seeing
        log.info("no shared corpus cache (%s): building %s in the workdir", e, name)
        return None


def _copy(shared: Path, dest: Path) -> Path:
    """`shared`'s files into `dest`, DONE last: the workdir holds its own copy of what it trains
    on."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(shared, dest, ignore=shutil.ignore_patterns(DONE, ".*"))
    atomic_write_text(dest / DONE, (shared / DONE).read_text(encoding="utf-8"))
    return dest


def _write(dest: Path, name: str, files: Callable[[], Iterator[tuple[str, str]]]) -> Path:
    if dest.exists():  # a run killed half-way: start over, the files are cheap to redo
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    count = chars = 0
    for filename, text in files():
        atomic_write_text(dest / filename, text)
        count += 1
        chars += len(text)
    if count == 0 or chars == 0:
        raise RuntimeError(
            f"found no Python documentation to build {name} from (stdlib at {_stdlib()})"
        )
    mark_done(dest, {"files": count, "chars": chars, "python": sys.version})
    log.info("wrote builtin corpus %s: %d files, %.1f MB of text", dest, count, chars / 1e6)
    return dest


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class _Doc:
    """A documented class or function of a stdlib module."""

    name: str
    doc: str  # as ast.get_docstring cleans it
    qualname: str | None = None  # set on public definitions at module or class level only
    signature: str | None = None


@dataclass(frozen=True)
class _Module:
    stem: str  # output file stem
    doc: str | None
    defs: tuple[_Doc, ...]  # in ast.walk order (breadth-first): what python-docs writes


@dataclass(frozen=True)
class SftPair:
    qualname: str
    prompt: str
    completion: str


@functools.lru_cache(maxsize=1)
def _scan() -> tuple[tuple[tuple[str, str], ...], tuple[_Module, ...]]:
    """The help topics (stem, text) and the stdlib's parsed modules, in a fixed order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    topic_texts = tuple(
        (f"topic-{_safe(k)}", topics[k].strip()) for k in sorted(topics) if topics[k].strip()
    )
    root = _stdlib()
    modules = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(rel))
        except (
            SyntaxError,
            ValueError,
            OSError,
        ):  # lib2to3 test data and friends are not valid Python
            continue
        parts = rel.with_suffix("").parts
        module = ".".join(parts)
        public = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if any(p.startswith("_") and p != "__init__" for p in parts) or any(
            p.startswith("test") for p in parts
        ):
            public = ""  # private or test module: no pairs
        named = _public_defs(tree.body, public) if public else {}
        defs = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    qualname, signature = named.get(id(node), (None, None))
                    defs.append(_Doc(node.name, doc, qualname, signature))
        modules.append(_Module(f"module-{_safe(module)}", ast.get_docstring(tree), tuple(defs)))
    return topic_texts, tuple(modules)


def _public_defs(body: list[ast.stmt], prefix: str) -> dict[int, tuple[str, str]]:
    """(dotted name, signature) of the public classes and functions at module level and inside
    public classes (not inside functions), by node id."""
    out: dict[int, tuple[str, str]] = {}
    for node in body:
        if not isinstance(
            node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
        ) or node.name.startswith("_"):
            continue
        qualname = f"{prefix}.{node.name}"
        out[id(node)] = (qualname, _signature(node))
        if isinstance(node, ast.ClassDef):
            out.update(_public_defs(node.body, qualname))
    return out


def _signature(node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    if isinstance(node, ast.ClassDef):
        bases = [ast.unparse(b) for b in node.bases]
        bases += [
            f"{k.arg}={ast.unparse(k.value)}" if k.arg else f"**{ast.unparse(k.value)}"
            for k in node.keywords
        ]
        return f"class {node.name}({', '.join(bases)}):" if bases else f"class {node.name}:"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    kind = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{kind} {node.name}({ast.unparse(node.args)}){returns}:"


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _completion(d: _Doc) -> str | None:
    """The docstring's first paragraph as a completion, or None when it makes a poor one."""
    first = _normalise(_PARAGRAPH_BREAK.split(d.doc.strip(), maxsplit=1)[0])
    if not MIN_COMPLETION_CHARS <= len(first) <= MAX_COMPLETION_CHARS:
        return None
    if first.endswith(":") or ">>>" in first:
        return None  # introduces a list or an example that the next paragraphs hold
    if first.startswith((f"{d.name}(", f"{d.name} (")):
        return None  # a C-style "name(args) -> result" line repeats the signature
    return first


def _sft_candidates() -> list[SftPair]:
    """Usable pairs, one per distinct completion (the first in module order), capped by name
    hash."""
    _, modules = _scan()
    pairs: list[SftPair] = []
    seen: set[str] = set()
    for m in modules:
        for d in m.defs:
            if d.qualname is None or d.signature is None or len(d.signature) > MAX_SIGNATURE_CHARS:
                continue
            completion = _completion(d)
            if completion is None or completion in seen:
                continue
            seen.add(completion)
            pairs.append(SftPair(d.qualname, f'# {d.qualname}\n{d.signature}\n    """', completion))
    if len(pairs) > MAX_SFT_PAIRS:
        rank = sorted(
            pairs, key=lambda p: hashlib.blake2b(p.qualname.encode(), digest_size=8).digest()
        )
        chosen = {p.qualname for p in rank[:MAX_SFT_PAIRS]}
        pairs = [p for p in pairs if p.qualname in chosen]
    return pairs


@functools.lru_cache(maxsize=1)
def _sft_pairs() -> tuple[SftPair, ...]:
    """The candidates whose completions python-docs can leave out (see the module docstring)."""
    pairs = _sft_candidates()
    held = {p.completion for p in pairs}
    while True:  # leaving fewer paragraphs out only adds text, so this ends (in 2 rounds here)
        text = "\x00".join(_normalise(t) for _, t in _texts(frozenset(held)))
        leaked = {c for c in held if c in text}
        if not leaked:
            break
        held -= leaked
    return tuple(p for p in pairs if p.completion in held)


def _documents() -> Iterator[tuple[str, str]]:
    """python-docs as (file stem, text) pairs in a fixed order: help topics first, then modules by
    path; without the paragraphs python-sft uses as completions."""
    yield from _texts(frozenset(p.completion for p in _sft_pairs()))


def _texts(held: frozenset[str]) -> Iterator[tuple[str, str]]:
    topics, modules = _scan()
    for stem, text in topics:
        text = _without(text, held)
        if text:
            yield stem, text + "\n"
    for m in modules:
        parts: list[str] = []
        doc = _without(m.doc or "", held)
        if doc:
            parts.append(doc)
        # ast.walk is breadth-first and deterministic; qualified names are not needed for prose.
        for d in m.defs:
            doc = _without(d.doc, held)
            if len(doc) >= 40:  # skip "Return self." style one-liners
                parts.append(f"{d.name}\n\n{doc}")
        if parts:
            yield m.stem, "\n\n".join(parts).strip() + "\n"


def _without(text: str, held: frozenset[str]) -> str:
    """`text` without its paragraphs equal (whitespace normalised) to one of `held`."""
    paragraphs = _PARAGRAPH_BREAK.split(text)
    kept = [p for p in paragraphs if _normalise(p) not in held]
    return (text if len(kept) == len(paragraphs) else "\n\n".join(kept)).strip()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


# The builtin corpora by their input spec; each writes its files under the folder it is given, once.
BUILTINS = {"builtin:python-docs": materialize, "builtin:python-sft": materialize_sft}
