"""The `gptflow` command line: one subcommand per stage, `run` and `plan` (the pipeline),
`generate`, `explain`.

Each stage subcommand takes ``--config FILE`` and ``--set section.key=value`` overrides, plus
shortcuts for the common case; the last line it prints is the stage's output directory, so
scripts can chain stages: ``data=$(gptflow preprocess ... | tail -1)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from flows.config import ConfigError, PipelineConfig, load_config

log = logging.getLogger("gptflow")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="pipeline YAML (default: the embedded local config)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set pretrain.lr=3e-4 (repeatable)",
    )
    p.add_argument("--workdir", help="root directory of all stage outputs (workdir)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="dataset directory from `gptflow preprocess`")
    p.add_argument("--preset", help="model preset (tiny, gpt2-124m, ...)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--workers", type=int, help="Ray Train workers")


def _step_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="STEP",
        help="run only this step (repeatable)",
    )
    p.add_argument(
        "--from", dest="start", metavar="STEP", help="run this step and every step after it"
    )
    p.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STEP",
        help="re-run this step (and the steps downstream of it) even when done (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    summary = " ".join(__doc__.split("\n\n")[0].split())  # the docstring's first paragraph
    parser = argparse.ArgumentParser(prog="gptflow", description=summary)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    # In the order `gptflow --help` lists them.
    for add in (
        _stage_parsers,
        _pipeline_parsers,
        _evaluation_parsers,
        _registry_parsers,
        _serve_parser,
        _capacity_parser,
        _model_file_parsers,
        _info_parsers,
    ):
        add(sub)
    from flows.ops import commands as ops  # submit, jobs, schedule

    ops.add_parsers(sub, _config_args, _step_args)
    return parser


_MODEL_SOURCES = "bundle dir, models:/NAME@ALIAS, builtin:NAME, a .gguf or a HF directory"


def _stage_parsers(sub: argparse._SubParsersAction) -> None:
    """preprocess, pretrain, finetune, distill: one pipeline step each (distill: its steps)."""
    p = sub.add_parser("preprocess", help="raw text -> tokenizer + packed token shards")
    _config_args(p)
    p.add_argument(
        "--input", action="append", default=[], help="file, folder, glob or URL (repeatable)"
    )
    p.add_argument("--sft", action="append", default=[], help="fine-tuning JSONL (repeatable)")

    p = sub.add_parser("pretrain", help="train a GPT from scratch (Ray Train + DeepSpeed)")
    _config_args(p)
    _train_args(p)

    p = sub.add_parser("finetune", help="fine-tune a model on prompt/completion data")
    _config_args(p)
    _train_args(p)
    p.add_argument("--init", help=_MODEL_SOURCES)

    p = sub.add_parser(
        "distill",
        help="train a smaller student from a teacher model, then evaluate, register "
        "and promote it under its own name",
    )
    _config_args(p)
    p.add_argument("--teacher", help=f"{_MODEL_SOURCES} (default: the pipeline's final model)")
    p.add_argument(
        "--student-preset", help="the student's model preset (default: distill.student_preset)"
    )
    p.add_argument(
        "--data",
        help="dataset directory from `gptflow preprocess` (tokenized with the teacher's tokenizer)",
    )
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument(
        "--alpha", type=float, help="weight of the labels' cross-entropy (distill.alpha)"
    )
    p.add_argument(
        "--temperature", type=float, help="softmax temperature of the KL term (distill.temperature)"
    )


def _pipeline_parsers(sub: argparse._SubParsersAction) -> None:
    """run and plan: the whole pipeline, or what it would do."""
    p = sub.add_parser("run", help="the pipeline: preprocess -> pretrain -> finetune -> evaluate")
    _config_args(p)
    _step_args(p)

    p = sub.add_parser(
        "plan", help="print the steps, their output paths and whether each is done; runs nothing"
    )
    _config_args(p)
    _step_args(p)


def _evaluation_parsers(sub: argparse._SubParsersAction) -> None:
    """evaluate and explain: a bundle's figures on data, and one text explained."""
    p = sub.add_parser("evaluate", help="evaluate a model bundle on a dataset's validation splits")
    _config_args(p)
    p.add_argument("bundle", help="model bundle directory")
    p.add_argument("--data", required=True, help="dataset directory from `gptflow preprocess`")

    p = sub.add_parser(
        "explain", help="per-token loss, attention maps and attributions for any text"
    )
    p.add_argument("bundle", help="model bundle directory")
    p.add_argument("text", help="the text to explain")
    p.add_argument(
        "--out",
        default="explain",
        help="directory for the HTML/PNG/JSON files (default: ./explain)",
    )


def _registry_parsers(sub: argparse._SubParsersAction) -> None:
    """promote, rollback, models, lineage: the MLflow registry."""
    p = sub.add_parser(
        "promote", help="promote a registered version to @champion through the gate (or --force)"
    )
    _config_args(p)
    p.add_argument("name", help="registered model name")
    p.add_argument("--version", required=True, help="the version to promote")
    p.add_argument("--force", action="store_true", help="skip the gate")

    p = sub.add_parser("rollback", help="move @champion back to the previous champion")
    _config_args(p)
    p.add_argument("name", help="registered model name")

    p = sub.add_parser(
        "models", help="a registered model's versions, aliases, gate results and metrics"
    )
    _config_args(p)
    p.add_argument("name", help="registered model name")

    p = sub.add_parser(
        "lineage", help="where a model came from: runs, bundles, datasets, raw inputs"
    )
    _config_args(p)
    p.add_argument("ref", help="NAME@ALIAS or NAME/VERSION")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over OpenAI's HTTP API (Ray Serve, continuous batching)"
    )
    _config_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--model",
        help="NAME@ALIAS in the registry, followed as it moves (default: <registry>@champion)",
    )
    which.add_argument("--bundle", help="a model bundle directory, served as it is")
    p.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")


def _capacity_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "capacity", help="memory per GPU for ZeRO 0-3, whether it fits, and the training time"
    )
    _config_args(p)
    p.add_argument(
        "--preset",
        help="model preset (default: model.preset); --set model.context_length=N to change it",
    )
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200: 989)"
    )
    p.add_argument(
        "--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time estimate"
    )
    p.add_argument("--tokens", type=float, help="token budget for the time estimate, e.g. 30e9")
    p.add_argument(
        "--micro-batch",
        type=int,
        help="sequences per GPU per step (default: pretrain.micro_batch_size)",
    )
    p.add_argument(
        "--precision", help="fp32, bf16, bf16-autocast or fp16 (default: pretrain.precision)"
    )


def _model_file_parsers(sub: argparse._SubParsersAction) -> None:
    """import, export, generate: model files and bundles, no config."""
    p = sub.add_parser(
        "import", help="a pretrained model (HF directory, .gguf, builtin:NAME) -> a model bundle"
    )
    p.add_argument(
        "source",
        help="HF directory (llama or gpt2), a .gguf file, or builtin:smollm2-135m-instruct",
    )
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--dtype", default="fp32", help="weights in the bundle: fp32 (default) or bf16")

    p = sub.add_parser(
        "export", help="a model bundle -> a Hugging Face directory transformers loads"
    )
    p.add_argument("bundle", help="model bundle directory")
    p.add_argument("--out", required=True, help="directory to write (new or empty)")

    p = sub.add_parser("generate", help="generate text from a model bundle")
    p.add_argument("bundle", help="model bundle directory")
    p.add_argument("prompt", nargs="?", help="prompt text (or --chat)")
    p.add_argument(
        "--chat",
        help="a user message: rendered with the model's chat template, answered until "
        "the end of the turn; prints the answer alone",
    )
    p.add_argument("--system", help="with --chat: a system message")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)


def _info_parsers(sub: argparse._SubParsersAction) -> None:
    """status and config: what is there, and what the configuration resolves to."""
    p = sub.add_parser(
        "status",
        help="the last run's steps, the registry's champion and challenger, what serve "
        "would load, the schedule: one screen",
    )
    _config_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("config", help="print the resolved configuration as JSON")
    _config_args(p)


def resolve_config(args: argparse.Namespace) -> PipelineConfig:
    """Config file, then --set overrides, then the subcommand's shortcuts (which win)."""
    overrides = list(args.overrides)
    if getattr(args, "workdir", None):
        overrides.append(f"workdir={json.dumps(args.workdir)}")
    if getattr(args, "no_tracking", False):
        overrides.append("tracking.enabled=false")
    if getattr(args, "input", None):
        overrides.append(f"data.inputs={json.dumps(args.input)}")
    if getattr(args, "sft", None):
        overrides.append(f"data.sft_inputs={json.dumps(args.sft)}")
    section = args.command if args.command in ("pretrain", "finetune", "distill") else None
    if section:
        if args.data:
            overrides.append(f"{section}.data={json.dumps(args.data)}")
        if args.steps is not None:
            overrides.append(f"{section}.steps={args.steps}")
        if args.workers is not None:
            overrides.append(f"{section}.num_workers={args.workers}")
        if getattr(args, "preset", None):
            overrides.append(f"model.preset={json.dumps(args.preset)}")
        if getattr(args, "init", None):
            overrides.append(f"{section}.init={json.dumps(args.init)}")
    if args.command == "distill":
        overrides.append("distill.enabled=true")
        overrides += [
            f"distill.{key}={json.dumps(v)}"
            for key, v in (
                ("teacher", args.teacher),
                ("student_preset", args.student_preset),
                ("alpha", args.alpha),
                ("temperature", args.temperature),
            )
            if v is not None
        ]
    if args.command == "capacity" and args.preset:
        overrides.append(f"model.preset={json.dumps(args.preset)}")
    if args.command == "serve":
        overrides += [
            f"serve.{k}={json.dumps(v)}"
            for k in ("host", "port")
            if (v := getattr(args, k)) is not None
        ]
    if args.command == "evaluate":
        overrides += [
            f"evaluate.bundle={json.dumps(args.bundle)}",
            f"evaluate.data={json.dumps(args.data)}",
        ]
    return load_config(args.config, overrides)


# A stage command is the pipeline narrowed to that step (its inputs from the flags or from the
# pipeline's own finished outputs); it prints the step's output directory last.
_STEP_COMMANDS = ("preprocess", "pretrain", "finetune", "evaluate")
# Commands that run pipeline steps: their terminal shows the pipeline's lines, the rest goes to
# logs/.
_PIPELINE_COMMANDS = ("run", *_STEP_COMMANDS, "distill")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "pretrain", "finetune", "distill", "evaluate"):
        # torch first: loaded late, after MLflow's and Ray's libraries, its MKL failed to load in a
        # Ray job's driver ("Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so", then a
        # segfault).
        import torch  # noqa: F401
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from flows.pipeline import PipelineError
    from flows.redact import redact_logs

    redact_logs()  # input and tracking URLs may carry credentials: none is printed

    console = (
        None  # the pipeline commands' terminal (flows/console.py): progress, output to log files
    )
    try:
        if args.command == "generate":
            print(_generate(args))
            return 0
        if args.command in ("import", "export"):
            from flows.models import importer

            if args.command == "import":
                print(importer.import_model(args.source, args.out, args.dtype), flush=True)
            else:
                print(importer.export_model(args.bundle, args.out), flush=True)
            return 0
        if args.command == "explain":
            print(_explain(args))
            return 0
        from flows.ops import commands as ops

        if args.command in ops.CONFIGLESS:
            out = ops.run(args, None)
            print(out, flush=True)
            return 0
        cfg = resolve_config(args)
        if args.command == "config":
            from flows.config import to_dict
            from flows.redact import redact

            print(json.dumps(redact(to_dict(cfg)), indent=2))
            return 0
        if args.command in _PIPELINE_COMMANDS:
            from flows.console import Console

            console = Console(cfg.workdir, verbose=args.verbose).__enter__()
        out = _run_command(args, cfg, console)
    except PipelineError as e:
        cause = e.__cause__
        _print_error(args, e, cause or e, console)
        # No cause: the steps asked for cannot run (an unknown step, an input not built): the user's
        # to fix.
        return 2 if cause is None or isinstance(cause, _USER_ERRORS) else 1
    except _USER_ERRORS as e:
        _print_error(args, e, e, console)
        return 2
    finally:
        # Ray forwards worker logs to stdout until it shuts down; stop it first so that the
        # output directory really is the last line printed (and Ray's goodbyes land in the log).
        from flows.cluster import shutdown_ray

        shutdown_ray()
        if console is not None:
            console.close()
    sys.stderr.flush()
    print(out, flush=True)
    return 0


# What a user can fix -- a bad config value or input, a file that is missing, malformed, unreadable
# or in the way (a permission error on the workdir): exit code 2, one line naming it, no traceback
# but with -v. Anything else is a bug or a failed run: exit 1 (or a traceback).
_USER_ERRORS = (
    ConfigError,
    ValueError,
    FileNotFoundError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
)


def _print_error(
    args: argparse.Namespace, e: BaseException, shown: BaseException, console: object = None
) -> None:
    """The one-line error (credentials in URLs redacted) and the failed step's log, and with -v the
    traceback of `shown`."""
    import traceback

    from flows.redact import redact_text

    err = getattr(console, "terminal", sys.stderr)
    print(f"gptflow {args.command}: error: {redact_text(str(e))}", file=err)
    failed_log = getattr(console, "failed_log", None)
    if failed_log is not None:
        from flows.console import shown as shown_path

        print(
            f"gptflow {args.command}: the step's log (Ray, DeepSpeed, MLflow output): "
            f"{shown_path(failed_log)}",
            file=err,
        )
    if args.verbose:
        print(redact_text("".join(traceback.format_exception(shown))), file=err, end="")


def _run_command(args: argparse.Namespace, cfg: PipelineConfig, progress: object = None) -> str:
    from flows import pipeline

    if args.command in _REGISTRY_COMMANDS:
        return _registry_command(args, cfg)
    if args.command == "capacity":
        return _capacity(args, cfg)
    if args.command == "status":
        from flows.status import render, status

        facts = status(cfg)
        return json.dumps(facts, indent=2, default=str) if args.json else render(facts)
    if args.command == "serve":
        from flows.serve.deploy import serve_forever, settings_for

        figures = serve_forever(cfg, settings_for(cfg, model=args.model, bundle=args.bundle))
        return json.dumps(figures, indent=2, default=str)
    from flows.ops import commands as ops

    if args.command in ops.COMMANDS:
        return ops.run(args, cfg)
    if args.command == "plan":
        planned = pipeline.plan(
            cfg, wanted=pipeline.select(cfg, pipeline.STEPS, args.only, args.start, args.force)[0]
        )
        return pipeline.describe(planned)
    if args.command in _STEP_COMMANDS:
        planned = pipeline.run(cfg, only=[args.command], progress=progress)
        out = pipeline.step_output(planned, args.command)
        if (
            args.command == "preprocess"
            and out is not None
            and (out / "curation" / "report.json").is_file()
        ):
            from flows.data.curate.report import table

            report = json.loads((out / "curation" / "report.json").read_text(encoding="utf-8"))
            return (
                table(report, out / "curation") + "\n" + str(out)
            )  # the directory stays the last line
        return str(out)
    if args.command == "distill":
        from flows.report import distill_report

        enabled = {s.name for s in pipeline.STEPS if s.enabled(cfg)}
        planned = pipeline.run(
            cfg, only=[s for s in pipeline.DISTILL_STEPS if s in enabled], progress=progress
        )
        return distill_report(cfg, planned)
    planned = pipeline.run(
        cfg, only=args.only, start=args.start, force=args.force, progress=progress
    )
    from flows.report import run_report

    return run_report(cfg, planned)


def _capacity(args: argparse.Namespace, cfg: PipelineConfig) -> str:
    from flows.config import PRECISIONS
    from flows.train.capacity import Hardware, report, with_context
    from gptcore import preset

    for name in ("gpus_per_node", "nodes", "micro_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={value} must be >= 1")
    for name in ("gpu_mem_gib", "peak_tflops", "mfu"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be > 0")
    precision = args.precision or cfg.pretrain.precision
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    try:
        gpt = with_context(
            preset(cfg.model.preset, activation_checkpointing=False), cfg.model.context_length
        )
    except ValueError as e:
        raise ConfigError(f"model.preset: {e}") from None
    hw = Hardware(args.gpus_per_node, args.nodes, args.gpu_mem_gib, args.peak_tflops, args.mfu)
    return report(
        gpt, args.micro_batch or cfg.pretrain.micro_batch_size, precision, hw, args.tokens
    )


_REGISTRY_COMMANDS = ("promote", "rollback", "models", "lineage")


def _registry_command(args: argparse.Namespace, cfg: PipelineConfig) -> str:
    from flows.registry import lineage, promote
    from flows.tracking import Registry

    registry = Registry(cfg.tracking, cfg.workdir)
    workdir = Path(cfg.workdir)
    if args.command == "promote":
        record = promote.promote_version(
            registry,
            args.name,
            str(args.version),
            cfg.registry,
            cfg.evaluate,
            workdir,
            force=args.force,
        )
        verdict = "is now champion" if record["promoted"] else "stays challenger"
        return f"{args.name}/{args.version} {verdict}: {record['reason']}"
    if args.command == "rollback":
        done = promote.rollback(registry, args.name, workdir)
        return f"{args.name}: champion rolled back from version {done['from']} to {done['to']}"
    if args.command == "models":
        return _models_table(registry, args.name)
    facts = lineage.lineage(registry, args.ref, workdir / "registry" / "cache")
    return json.dumps(facts, indent=2, default=str) if args.json else lineage.render(facts)


def _models_table(registry: object, name: str) -> str:
    rows = [("version", "aliases", "gate", "bits/byte", "perplexity", "stage", "bundle")]
    for v in registry.versions(name):  # type: ignore[attr-defined]
        t = v["tags"]
        rows.append(
            (
                v["version"],
                ",".join(v["aliases"]) or "-",
                t.get("gptflow.gate", "-"),
                t.get("gptflow.eval.val_bits_per_byte", "-")[:8],
                t.get("gptflow.eval.val_perplexity", "-")[:8],
                t.get("gptflow.stage", "-"),
                t.get("gptflow.bundle", "-"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows
    )


def _generate(args: argparse.Namespace) -> str:
    from gptcore import generate, load_bundle
    from gptcore.sampling import SamplingParams

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 0")
    try:  # before loading the model: a bad flag costs nothing
        sampling = SamplingParams(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
        )
    except ValueError as e:
        raise ValueError("--" + str(e).replace("_", "-", 1)) from None
    if (args.prompt is None) == (args.chat is None):
        raise ValueError("give a prompt or --chat MESSAGE (one of the two)")
    model, tok, _ = load_bundle(args.bundle)
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.chat}
        ]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    else:
        prompt = args.prompt
    ids = generate(
        model,
        tok.encode(prompt) or [tok.eot_id],
        args.max_new_tokens,
        sampling=dataclasses.replace(sampling, stop_ids=tuple(tok.stop_ids)),
    )
    return tok.decode(ids) if args.chat is not None else prompt + tok.decode(ids)


def _explain(args: argparse.Namespace) -> str:
    from flows.evaluate.explain import explain

    out = Path(args.out)
    explain(Path(args.bundle), args.text, out)
    return str(out.resolve())


if __name__ == "__main__":
    sys.exit(main())
