"""Step hashes stay put: every step's output key, for the shipped configs and a few overrides, is
the key main computed before the hashing rules moved from hand-written tuples in flows/pipeline.py
onto the config fields themselves.

The check is an independent re-derivation from main's hand-written tuples, written out here as the
spec. (The move itself was also checked against the literal keys main computed; they were dropped
when the test-only `fail_at_step` left TrainConfig, which changed them deliberately.) The inputs'
content (the raw corpus) is stubbed: it is not what the rules decide, and reading it would tie the
keys to this machine's Python docs.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from flows import pipeline
from flows.config import EvaluateConfig, PipelineConfig, load_config, stable_hash, to_dict
from flows.configlib import HASHED, hashed, unhashed
from flows.pipeline import STEPS, StepRef

ROOT = Path(__file__).resolve().parents[1]

# (YAML file or None, overrides): the shipped configs, every step switched on, and inputs and places
# given from outside (keys that must not enter the hashes set away from their defaults).
CONFIGS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "default": (None, ()),
    **{p.name: (str(p), ()) for p in sorted((ROOT / "configs").glob("*.yaml"))},
    "every-step": (
        None,
        ("serve.deploy=true", "distill.enabled=true", "distill.registry_name=kid"),
    ),
    "outside-inputs": (
        None,
        (
            "distill.enabled=true",
            "serve.deploy=true",
            "pretrain.data=/nowhere/dataset",
            "finetune.init=/nowhere/bundle",
            "evaluate.data=/nowhere/eval",
            "distill.teacher=/nowhere/teacher",
            "pretrain.run_name=mine",
            "finetune.storage_path=/nowhere/ckpt",
            "data.num_workers=3",
            "data.max_drop_fraction=0.5",
            "data.hf_split=validation",
            "registry.metric=perplexity",
            "registry.margin=0.2",
            "distill.init=/nowhere/student",
        ),
    ),
    "base-model": (
        None,
        (
            "model.base=builtin:smollm2-135m-instruct",
            "pretrain.steps=0",
            "model.context_length=64",
            "distill.enabled=true",
            "distill.data=/nowhere/dataset",
        ),
    ),
}


def _stub_inputs(data, ctx):
    """Stands in for flows.data.stage.fingerprint: the inputs' names, not their content."""
    return {"text": list(data.inputs), "sft": list(data.sft_inputs)}


def _cfg(name: str, workdir: Path) -> PipelineConfig:
    path, overrides = CONFIGS[name]
    return load_config(path, [*overrides, f"workdir={workdir}"])


def _keys(cfg: PipelineConfig) -> dict[str, str]:
    return {p.step.name: p.key for p in pipeline.plan(cfg)}


@pytest.fixture(autouse=True)
def _content_stubbed(monkeypatch):
    import flows.data.stage

    monkeypatch.setattr(flows.data.stage, "fingerprint", _stub_inputs)


# ------------------------------------------------------------------------ main's rules, written out

_TRAIN = ("data", "init", "run_name", "storage_path")
_DATA = (
    "inputs",
    "sft_inputs",
    "hf_dataset",
    "hf_config",
    "hf_split",
    "hf_data_files",
    "tokenizer_path",
    "num_workers",
    "max_drop_fraction",
)
_EVALUATE = ("bundle", "data")
# Per step, per section: the keys left out of the hash ...
MAIN_UNHASHED: dict[str, dict[str, tuple[str, ...]]] = {
    "preprocess": {"data": _DATA},
    "pretrain": {"pretrain": _TRAIN, "model": ("base",)},
    "finetune": {"finetune": _TRAIN, "model": ("base",)},
    "evaluate": {"evaluate": _EVALUATE},
    "register": {"registry": ("metric", "margin")},
    "promote": {"evaluate": _EVALUATE},
    "distill": {"distill": (*_TRAIN, "enabled", "teacher", "registry_name")},
    "distill_evaluate": {"evaluate": _EVALUATE},
    "distill_register": {"registry": ("metric", "margin")},
    "distill_promote": {"evaluate": _EVALUATE},
}
# ... or the only keys kept.
MAIN_KEPT: dict[str, dict[str, tuple[str, ...]]] = {
    "distill_register": {"distill": ("registry_name",)},
    "distill_promote": {"distill": ("registry_name",)},
}
MAIN_SECTIONS = {
    "import": (),
    "preprocess": ("data",),
    "pretrain": ("model", "pretrain"),
    "finetune": ("model", "finetune"),
    "evaluate": ("evaluate",),
    "register": ("registry",),
    "promote": ("registry", "evaluate"),
    "distill": ("distill",),
    "distill_evaluate": ("evaluate",),
    "distill_register": ("registry", "distill"),
    "distill_promote": ("registry", "evaluate", "distill"),
    "serve": ("serve",),
}


def _main_section(cfg: PipelineConfig, step: str, section: str) -> dict:
    values = to_dict(getattr(cfg, section))
    kept = MAIN_KEPT.get(step, {}).get(section)
    dropped = MAIN_UNHASHED.get(step, {}).get(section, ())
    return {k: v for k, v in values.items() if (kept is None or k in kept) and k not in dropped}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_keys_follow_mains_rules(name, tmp_path):
    cfg = _cfg(name, tmp_path)
    ctx = pipeline.context(cfg)
    planned = pipeline.plan(cfg, ctx=ctx)
    keys: dict[str, str] = {}
    for p in planned:
        identities = {
            arg: keys[b.step]
            if isinstance(b, StepRef)
            else pipeline._outside_identity(b, ctx)
            if b
            else None
            for arg, b in p.step.bind(cfg).items()
        }
        sections = {s: _main_section(cfg, p.step.name, s) for s in MAIN_SECTIONS[p.step.name]}
        fingerprint = p.step.fingerprint(cfg, ctx) if p.step.fingerprint else None
        keys[p.step.name] = stable_hash(p.step.name, sections, identities, fingerprint)
        assert p.key == keys[p.step.name], p.step.name


# -------------------------------------------------------------------------- the rules on the fields


def test_a_new_field_is_hashed_unless_declared_otherwise(tmp_path):
    """A field added without a word about hashing changes the keys of the steps that receive it."""
    cfg = load_config(None, [f"workdir={tmp_path}"])
    grown = dataclasses.make_dataclass(
        "GrownEvaluate",
        [
            ("new_knob", int, dataclasses.field(default=0)),
            ("new_input", str, unhashed("", why="an input")),
        ],
        bases=(EvaluateConfig,),
        frozen=True,
    )
    assert set(hashed(grown(), "evaluate")) == set(hashed(EvaluateConfig(), "evaluate")) | {
        "new_knob"
    }

    def key(**values) -> str:
        section = grown(**dataclasses.asdict(cfg.evaluate), **values)
        return {
            p.step.name: p.key for p in pipeline.plan(dataclasses.replace(cfg, evaluate=section))
        }["evaluate"]

    assert key(new_knob=1) != key(new_knob=0) == key(new_knob=0, new_input="elsewhere")
    fresh = dataclasses.make_dataclass(
        "Fresh", [("knob", int, dataclasses.field(default=3))], frozen=True
    )
    assert hashed(fresh(), "any step") == {"knob": 3}


def _fields(cls: type, name: str):
    """(dotted name, dataclass field) for every field under section `name`, nested sections too."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f"{name}.{f.name}", f
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], f"{name}.{f.name}")


def test_steps_named_by_the_fields_exist_and_receive_the_field():
    hints = typing.get_type_hints(PipelineConfig)
    steps = {s.name: s for s in STEPS}
    for section in (
        f.name
        for f in dataclasses.fields(PipelineConfig)
        if dataclasses.is_dataclass(hints[f.name])
    ):
        for dotted, f in _fields(hints[section], section):
            rule = f.metadata.get(HASHED, True)
            if isinstance(rule, bool):
                continue
            for name in rule:
                assert name in steps, f"{dotted} names step {name!r}, which is not in the pipeline"
                assert section in steps[name].sections or dotted in steps[name].sections, (
                    dotted,
                    name,
                )
