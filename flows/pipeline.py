"""The pipeline as data: the list of steps, who feeds whom, and one small runner.

``STEPS`` below is the whole pipeline. A step names the config sections it reads and the inputs
it takes; its ``run`` (flows/stages.py) hands exactly those to the stage function
(``preprocess(data, out, ctx)``, ``train(train, model, dataset, init, out, ctx)``,
``evaluate(evaluate, bundle, dataset, out, ctx)``, ``deploy_step(serve, registry, out, ctx)``),
which never reads another section and never decides whether it should run. The runner owns:

- the output path ``<workdir>/<step>/<hash>/``: the hash of the step's name, its own sections
  (less the keys their fields declare unhashed: those that only name inputs or places, see
  flows/configlib.py), its inputs' hashes and, for inputs from outside the pipeline (raw files, a
  given model or dataset), their content fingerprints;
- skip-if-done: ``DONE`` is written by the runner, last; a finished output is never rewritten;
- a lock per output directory, so two runs in one workdir never build the same output at once;
- the parent MLflow run and one nested run per step that runs;
- the error that says which step failed and why (the parent run is marked FAILED; finished steps
  keep their outputs).

An unchanged re-run computes hashes (cached file fingerprints: one ``stat`` per input file), finds
every DONE and returns without Ray, training or planning work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows import stages
from flows.config import PipelineConfig, stable_hash, to_dict
from flows.configlib import hashed
from flows.context import StepContext
from flows.progress import Progress
from flows.runstate import RunState
from flows.workdir import DONE, FingerprintCache, discard, is_done, locked, mark_done, stage_dir

log = logging.getLogger(__name__)

# An input is another step's output (by step name) or a path/URI from outside the pipeline.
Binding = dict[str, "StepRef | str | None"]


@dataclass(frozen=True)
class StepRef:
    """An input wired to another step's output."""

    step: str


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[PipelineConfig, Mapping[str, Path | str | None], Path, StepContext], Any]
    """Calls the stage with its own sections, its inputs and its output directory."""
    sections: tuple[str, ...]
    """The config sections the stage receives (``section.key``: the one key of it that it reads);
    they enter the output hash, less the fields declared unhashed where they are
    (flows/configlib.py)."""
    bind: Callable[[PipelineConfig], Binding]
    """The step's inputs: another step's output (StepRef) or an outside path, by parameter name."""
    fingerprint: Callable[[PipelineConfig, StepContext], Any] | None = None
    """Content identity of outside inputs the step finds itself (raw corpus files)."""
    enabled: Callable[[PipelineConfig], bool] = lambda cfg: True


# The steps `gptflow distill` runs: the student's training, evaluation, registration and promotion.
DISTILL_STEPS = ("distill", "distill_evaluate", "distill_register", "distill_promote")


# ----------------------------------------------------------------------- the steps: when, from what


def _registers(cfg: PipelineConfig) -> bool:
    return cfg.registry.enabled and cfg.tracking.enabled


def _finetunes(cfg: PipelineConfig) -> bool:
    asks = any(
        t.ask for source in cfg.data.knowledge for t in source.templates
    )  # knowledge becomes SFT pairs
    return bool(cfg.data.sft_inputs or cfg.finetune.data or asks)


def _based(cfg: PipelineConfig) -> bool:
    return bool(cfg.model.base)


def _pretrains(cfg: PipelineConfig) -> bool:
    """Pretraining runs unless it would continue a base model for 0 steps."""
    return not (_based(cfg) and cfg.pretrain.steps == 0)


def _trained_model(cfg: PipelineConfig) -> StepRef:
    """What fine-tuning starts from: the (continued) pretraining, or the base itself."""
    return StepRef("pretrain" if _pretrains(cfg) else "import")


def _final_model(cfg: PipelineConfig) -> StepRef:
    return StepRef("finetune") if _finetunes(cfg) else _trained_model(cfg)


def _distills(cfg: PipelineConfig) -> bool:
    return cfg.distill.enabled


def _student_eval_data(cfg: PipelineConfig) -> StepRef | str:
    """The student is evaluated on evaluate.data, else the data it learned from."""
    return cfg.evaluate.data or cfg.distill.data or StepRef("preprocess")


def _base_ref(cfg: PipelineConfig) -> StepRef | None:
    return StepRef("import") if _based(cfg) else None


STEPS: tuple[Step, ...] = (
    # model.base (off by default): the base model as a bundle, named by the source's content (a step
    # of no sections and no inputs: flows/models/base.py's ensure() finds the same directory).
    Step(
        "import",
        stages.import_base,
        (),
        bind=lambda cfg: {},
        fingerprint=stages.base_identity,
        enabled=_based,
    ),
    Step(
        "preprocess",
        stages.preprocess,
        ("data",),
        bind=lambda cfg: {"base": _base_ref(cfg)} if _based(cfg) else {},
        fingerprint=stages.data_fingerprint,
    ),  # the inputs enter by content
    Step(
        "pretrain",
        stages.trainer("pretrain"),
        ("model", "pretrain"),
        bind=lambda cfg: {
            "dataset": cfg.pretrain.data or StepRef("preprocess"),
            "init": cfg.pretrain.init or _base_ref(cfg),
        },
        enabled=_pretrains,
    ),
    Step(
        "finetune",
        stages.trainer("finetune"),
        ("model", "finetune"),
        bind=lambda cfg: {
            "dataset": cfg.finetune.data or StepRef("preprocess"),
            "init": cfg.finetune.init or _trained_model(cfg),
        },
        enabled=_finetunes,
    ),
    Step(
        "evaluate",
        stages.evaluate,
        ("evaluate",),
        bind=lambda cfg: {
            "bundle": cfg.evaluate.bundle or _final_model(cfg),
            "dataset": cfg.evaluate.data or StepRef("preprocess"),
            **({"base": _base_ref(cfg)} if _based(cfg) else {}),
        },
    ),
    Step(
        "register",
        stages.register,
        ("registry",),
        bind=lambda cfg: {
            "bundle": cfg.evaluate.bundle or _final_model(cfg),
            "evaluation": StepRef("evaluate"),
            "dataset": cfg.evaluate.data or StepRef("preprocess"),
        },
        enabled=_registers,
    ),
    Step(
        "promote",
        stages.promote,
        ("registry", "evaluate"),
        bind=lambda cfg: {"registered": StepRef("register")},
        enabled=_registers,
    ),
    # Distillation (off by default): a student learns from the final model (or distill.teacher),
    # then is evaluated, registered under its own name and promoted through the same gate as any
    # model.
    Step(
        "distill",
        stages.distill,
        ("distill",),
        bind=lambda cfg: {
            "dataset": cfg.distill.data or StepRef("preprocess"),
            "teacher": cfg.distill.teacher or _final_model(cfg),
            "init": cfg.distill.init,
        },
        enabled=_distills,
    ),
    Step(
        "distill_evaluate",
        stages.evaluate,
        ("evaluate",),
        bind=lambda cfg: {"bundle": StepRef("distill"), "dataset": _student_eval_data(cfg)},
        enabled=_distills,
    ),
    Step(
        "distill_register",
        stages.register_student,
        ("registry", "distill.registry_name"),
        bind=lambda cfg: {
            "bundle": StepRef("distill"),
            "evaluation": StepRef("distill_evaluate"),
            "dataset": _student_eval_data(cfg),
        },
        enabled=lambda cfg: _registers(cfg) and _distills(cfg),
    ),
    Step(
        "distill_promote",
        stages.promote_student,
        ("registry", "evaluate", "distill.registry_name"),
        bind=lambda cfg: {"registered": StepRef("distill_register")},
        enabled=lambda cfg: _registers(cfg) and _distills(cfg),
    ),
    # deploy_step also reads registry.name (the alias it follows): it enters the key through
    # promote's.
    Step(
        "serve",
        stages.serve,
        ("serve",),
        bind=lambda cfg: {"promoted": StepRef("promote")},
        enabled=lambda cfg: _registers(cfg) and cfg.serve.deploy,
    ),
)


# --------------------------------------------------------------------------- planning


class PipelineError(RuntimeError):
    """A step failed, or the requested steps cannot run; the message names the step."""


@dataclass
class PlannedStep:
    step: Step
    key: str
    out: Path
    inputs: dict[str, Path | str | None]
    upstream: tuple[str, ...]
    done: bool
    status: str = "pending"  # then: done (reused), ran, failed, not run
    seconds: float = 0.0


def _hashed_sections(cfg: PipelineConfig, step: Step) -> dict[str, dict[str, Any]]:
    """The part of each of the step's sections that enters its key (what the fields declare)."""
    out: dict[str, dict[str, Any]] = {}
    for spec in step.sections:
        name, _, key = spec.partition(".")
        out[name] = hashed(getattr(cfg, name), step.name, only=(key,) if key else ())
    return out


def _outside_identity(value: str, ctx: StepContext) -> Any:
    """Content identity of an input given from outside the pipeline (a dataset, a bundle, a
    model)."""
    path = Path(value)
    if value.startswith("models:/"):
        # An alias moves: the identity is the version it names now, so a new champion re-runs the
        # step.
        from flows.models.base import identity

        return identity(value, ctx)
    if "://" in value or not path.exists():
        return value  # a URL: named, not read here (the stage resolves it)
    if path.is_file():  # a model file (.gguf)
        return {path.name: ctx.fingerprints.sha256(path)}
    for name in ("manifest.json", "model.safetensors"):  # a dataset directory, or a model bundle
        if (path / name).is_file():
            return {name: ctx.fingerprints.sha256(path / name)}
    weights = sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".bin", ".json"))
    return {p.name: ctx.fingerprints.sha256(p) for p in weights if p.is_file()}


def plan(
    cfg: PipelineConfig,
    steps: Sequence[Step] = STEPS,
    ctx: StepContext | None = None,
    wanted: Sequence[str] | None = None,
) -> list[PlannedStep]:
    """The enabled steps (or `wanted` and what they need) with their hash, output directory, inputs
    and whether each is done. Runs nothing."""
    ctx = ctx or context(cfg)
    enabled = [s for s in steps if s.enabled(cfg)]
    bindings = {s.name: s.bind(cfg) for s in enabled}
    needed = _with_upstream(wanted, bindings) if wanted is not None else set(bindings)
    planned: dict[str, PlannedStep] = {}
    for step in enabled:
        if step.name not in needed:
            continue
        inputs: dict[str, Path | str | None] = {}
        identities: dict[str, Any] = {}
        upstream = []
        for name, binding in bindings[step.name].items():
            if isinstance(binding, StepRef):
                if binding.step not in planned:
                    raise PipelineError(
                        f"step {step.name!r} takes {name} from step {binding.step!r}, which is "
                        "not in the pipeline (disabled, or after it)"
                    )
                inputs[name] = planned[binding.step].out
                identities[name] = planned[binding.step].key
                upstream.append(binding.step)
            else:
                inputs[name] = binding
                identities[name] = _outside_identity(binding, ctx) if binding else None
        key = stable_hash(
            step.name,
            _hashed_sections(cfg, step),
            identities,
            step.fingerprint(cfg, ctx) if step.fingerprint else None,
        )
        out = stage_dir(cfg.workdir, step.name, key).resolve()
        planned[step.name] = PlannedStep(step, key, out, inputs, tuple(upstream), is_done(out))
    ctx.fingerprints.save()
    return list(planned.values())


def _with_upstream(names: Sequence[str], bindings: Mapping[str, Binding]) -> set[str]:
    """`names` and every step they take an input from, transitively."""
    out: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo += [b.step for b in bindings.get(name, {}).values() if isinstance(b, StepRef)]
    return out


def context(cfg: PipelineConfig, **kwargs: Any) -> StepContext:
    workdir = Path(cfg.workdir)
    return StepContext(
        workdir=workdir,
        tracking=cfg.tracking,
        cluster=cfg.cluster,
        fingerprints=FingerprintCache(workdir / ".fingerprints.json"),
        **kwargs,
    )


def select(
    cfg: PipelineConfig,
    steps: Sequence[Step],
    only: Sequence[str] = (),
    start: str | None = None,
    force: Sequence[str] = (),
) -> tuple[list[str], set[str]]:
    """(steps to run when not done, steps to re-run even when done) for --only / --from / --force.

    A forced step's output is rebuilt, so the steps downstream of it are rebuilt too (within
    --only).
    """
    enabled = [s for s in steps if s.enabled(cfg)]
    names = [s.name for s in enabled]
    for name in [*only, *([start] if start else []), *force]:
        if name not in names:
            raise PipelineError(f"no step {name!r} in this pipeline; its steps: {', '.join(names)}")
    chosen = list(only) if only else names[names.index(start) :] if start else names
    forced: set[str] = set()
    for s in enabled:
        takes = {b.step for b in s.bind(cfg).values() if isinstance(b, StepRef)}
        if s.name in force or forced & takes:
            forced.add(s.name)
    if only:
        forced &= set(chosen)
    return [n for n in names if n in set(chosen) | forced], forced


# --------------------------------------------------------------------------- running


def run(
    cfg: PipelineConfig,
    only: Sequence[str] = (),
    start: str | None = None,
    force: Sequence[str] = (),
    steps: Sequence[Step] = STEPS,
    progress: Progress | None = None,
) -> list[PlannedStep]:
    """Run the pipeline (or the selected steps); return the planned steps with their outcome.

    `progress` (the CLI's console) is where steps report; each step runs inside its ``step()``.
    """
    from flows.tracking import check_reachable, stage_run, tracking_uri

    if (
        cfg.tracking.enabled
    ):  # a tracking server that is down: one line now, not minutes of retries later
        check_reachable(tracking_uri(cfg.tracking, cfg.workdir))
    started = time.time()
    base = context(cfg, progress=progress or Progress())
    chosen, forced = select(cfg, steps, only, start, force)
    planned = plan(cfg, steps, base, wanted=chosen)
    todo = [p for p in planned if p.step.name in chosen and (not p.done or p.step.name in forced)]
    for p in planned:
        if p.step.name not in chosen:
            p.status = "done" if p.done else "not run"
    for p in todo:  # every input a step needs must be done or about to be built in this run
        for up in p.upstream:
            prior = next(q for q in planned if q.step.name == up)
            if not prior.done and prior not in todo:
                raise PipelineError(
                    f"step {p.step.name!r} needs the output of {up!r} ({prior.out}), which is not "
                    f"done; run it first (gptflow run --from {up}) or drop --only"
                )
    if not todo:
        for p in planned:
            if p.step.name in chosen:
                p.status = "done"
        log.info("pipeline: every step is done; nothing to run (%.1f s)", time.time() - started)
        return planned

    state = RunState(cfg.workdir, planned)  # for `gptflow status`
    state.write()
    parent_id = None
    try:
        with stage_run(cfg.tracking, cfg.workdir, "pipeline", {"config": to_dict(cfg)}) as parent:
            parent_id = parent.run_id
            parent.set_tags({f"gptflow.step.{p.step.name}": str(p.out) for p in planned})
            runs = {
                p.step.name: done_info(p.out).get("run_id")
                for p in planned
                if p.done and p not in todo
            }
            for p in planned:
                if p not in todo:
                    if p.status == "pending":
                        p.status = "done"
                    continue
                ctx = dataclasses.replace(
                    base,
                    parent_run_id=parent.run_id,
                    step_runs={k: v for k, v in runs.items() if v},
                )
                runs[p.step.name] = _run_step(cfg, p, ctx, p.step.name in forced, state)
            parent.set_tags({"gptflow.steps": json.dumps({p.step.name: p.status for p in planned})})
    finally:
        state.finish(parent_id)
    return planned


def _run_step(
    cfg: PipelineConfig, p: PlannedStep, base: StepContext, fresh: bool, state: RunState
) -> str | None:
    """Build one step's output under its lock; return the step's MLflow run id."""
    from flows.tracking import stage_run

    t0 = time.time()
    with base.progress.step(p.step.name) as log_file, locked(p.out.parent / f".{p.out.name}.lock"):
        state.step(p.step.name, "running", log=log_file)
        if is_done(p.out) and not fresh:  # another run built it while this one waited for the lock
            p.status = "done"
            state.step(p.step.name, "done")
            return done_info(p.out).get("run_id")
        if fresh and p.out.exists():
            discard(p.out)  # DONE first: a kill half-way must not leave DONE beside missing files
        p.out.mkdir(parents=True, exist_ok=True)
        try:
            with stage_run(cfg.tracking, cfg.workdir, p.step.name) as tracker:
                tracker.set_tags(
                    {
                        "gptflow.step_key": p.key,
                        "gptflow.output_dir": str(p.out),
                        **{f"gptflow.input.{k}": str(v) for k, v in p.inputs.items() if v},
                    }
                )
                ctx = dataclasses.replace(base, tracker=tracker, fresh=fresh)
                p.step.run(cfg, p.inputs, p.out, ctx)
                p.seconds = time.time() - t0
                mark_done(
                    p.out,
                    {
                        "step": p.step.name,
                        "key": p.key,
                        "run_id": tracker.run_id,
                        "seconds": round(p.seconds, 3),
                        "inputs": {k: str(v) if v else None for k, v in p.inputs.items()},
                    },
                )
        except Exception as e:
            p.status, p.seconds = "failed", time.time() - t0
            state.step(p.step.name, "failed", p.seconds, error=str(e))
            raise PipelineError(f"step {p.step.name!r} failed: {e}") from e
    p.status = "ran"
    state.step(p.step.name, "ran", p.seconds)
    log.info("step %s: done in %.1f s -> %s", p.step.name, p.seconds, p.out)
    return tracker.run_id


def step_output(planned: list[PlannedStep], name: str) -> Path | None:
    return next((p.out for p in planned if p.step.name == name), None)


def describe(planned: list[PlannedStep]) -> str:
    """The step table: name, status, seconds, output directory, inputs."""
    rows = [("step", "status", "time", "output")]
    for p in planned:
        status = p.status if p.status != "pending" else ("done" if p.done else "to run")
        rows.append((p.step.name, status, f"{p.seconds:.1f} s" if p.seconds else "", str(p.out)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows
    )


def done_info(path: Path) -> dict[str, Any]:
    """The DONE record of a finished step output."""
    return json.loads((path / DONE).read_text(encoding="utf-8"))
