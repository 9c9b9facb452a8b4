"""What every config section is made of: the checks, the hashing metadata, the strict loader,
hashing.

The sections themselves live beside the stages they configure (flows/data/config.py, flows/train/
config.py, ...); flows/config.py composes them into :class:`~flows.config.PipelineConfig`. Nothing
here knows a section: :func:`build` makes any frozen dataclass from a mapping, checking every key
and type, and :func:`hashed` picks the part of a section that enters a pipeline step's output key.

Which keys enter a step's hash is said where each field is declared: a field is hashed unless it is
declared with :func:`unhashed` (it names an input, a place, or whether a step runs) or
:func:`hashed_only_by` (only some of the steps that receive its section read it). A new field is
hashed by default: forgetting to say otherwise re-runs a step, never reuses a wrong output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value the user must fix; the message names the key and its source."""


def check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: must be {valid}")


def check_finite(cfg: Any) -> None:
    """No float setting may be NaN or infinite (YAML reads .nan and .inf; `x >= 0` lets inf
    through)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        check(
            not isinstance(value, float) or math.isfinite(value), f.name, value, "a finite number"
        )


# ------------------------------------------------------------------------ what enters a step's hash

# The field metadata key: absent or True (hashed), False (never), or the names of the steps that
# hash it.
HASHED = "hashed"
# The most common reason a field is unhashed: another step's key, or the content, stands for it.
NAMES_INPUT = "an input: it enters the hash as the producing step's key, or by its content"


def unhashed(default: Any, *, why: str) -> Any:
    """A field no step's output key holds; `why` says what it names instead of what the step makes:
    an input (whose content, or producing step's key, enters the hash instead), a place, or whether
    a step runs."""
    return field(default=default, metadata={HASHED: False, "why": why})


def hashed_only_by(*steps: str, default: Any, why: str) -> Any:
    """A field only the named steps' output keys hold: the other steps that receive its section do
    not read it; `why` says so."""
    return field(default=default, metadata={HASHED: steps, "why": why})


def enters_hash(f: dataclasses.Field, step: str) -> bool:
    """Whether field `f` is part of the output key of pipeline step `step`."""
    rule = f.metadata.get(HASHED, True)
    return rule if isinstance(rule, bool) else step in rule


def hashed(section: Any, step: str, only: tuple[str, ...] = ()) -> dict[str, Any]:
    """The part of config section `section` that enters step `step`'s output key, JSON-ready: every
    field but those declared otherwise (in nested sections too); with `only`, just those keys."""
    values = to_dict(section)
    _drop_unhashed(section, values, step)
    return {k: v for k, v in values.items() if not only or k in only}


def _drop_unhashed(section: Any, values: dict[str, Any], step: str) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if not enters_hash(f, step):
            del values[f.name]
        elif dataclasses.is_dataclass(value):
            _drop_unhashed(value, values[f.name], step)
        elif isinstance(value, tuple):  # a list of sections (data.knowledge)
            for item, item_values in zip(value, values[f.name], strict=True):
                if dataclasses.is_dataclass(item):
                    _drop_unhashed(item, item_values, step)


# --------------------------------------------------------------------------- loading


def load(cls: type, path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Any:
    """Dataclass `cls`: its defaults, then the YAML file at `path` (if any), then
    `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}"
            )
        raw = loaded
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(raw, key.strip().split("."), _override_value(value), item)
    return build(cls, raw, source)


def _override_value(text: str) -> Any:
    """A --set value as YAML (numbers, booleans, lists); text YAML cannot parse (`*.txt`) stays a
    string."""
    if not text.strip():
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict[str, Any], keys: list[str], value: Any, item: str) -> None:
    node = raw
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:  # absent, or an empty section in the YAML (`finetune:`)
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def build(cls: type, raw: Any, source: str, prefix: str = "", base: Any = None) -> Any:
    """Make dataclass `cls` from a mapping, checking every key and type; errors name key and source.

    Keys the mapping leaves out keep their value in `base` (the enclosing config's default for this
    section, e.g. the pipeline's pretraining defaults), else the dataclass default.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(
            f"{source}: unknown key {key!r}; valid keys here: {', '.join(sorted(fields))}"
        )
    defaults = {
        f.name: f.default_factory()
        for f in dataclasses.fields(cls)
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(hints[f.name])
    }
    kwargs = {
        name: _coerce(hints[name], value, source, f"{prefix}{name}", defaults.get(name))
        for name, value in raw.items()
    }
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {prefix}{e}") from None


def _coerce(tp: Any, value: Any, source: str, key: str, base: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):  # an empty section (`finetune:`) means all defaults
        return build(tp, value if value is not None else {}, source, key + ".", base)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {key}: bad value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(repr, typing.get_args(tp)))
            raise ConfigError(f"{source}: {key}={value!r} is not one of {choices}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {tp}")


# --------------------------------------------------------------------------- hashing


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": value}, for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def stable_hash(*parts: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of `parts` (dataclasses become dicts), truncated."""

    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"cannot hash {type(o).__name__}")

    blob = json.dumps(parts, sort_keys=True, default=default, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
