"""`gptflow status`: one screen on a workdir -- the last run, the registry, what serving would load,
the schedule.

What it reads, and nothing else: the runner's record of the last run (flows/runstate.py), the
steps' finished outputs for each step's key figure (train_result.json, metrics.json, decision.json,
manifest.json), MLflow's registry through flows/tracking.py, and the scheduler's state files
(flows/ops/schedule.py). It changes nothing and starts no Ray.

A step recorded ``running`` whose process is gone (same host, no such pid) shows as ``interrupted``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from flows import runstate
from flows.config import PipelineConfig

_SHOWN = {
    "ran": "done",
    "done": "done",
    "running": "running",
    "failed": "failed",
    "not run": "not run",
}


def status(cfg: PipelineConfig) -> dict[str, Any]:
    """Everything `gptflow status` shows, as data (``--json`` prints it as it is)."""
    workdir = Path(cfg.workdir)
    run = runstate.read(workdir)
    out: dict[str, Any] = {
        "workdir": str(workdir.resolve()),
        "run": None,
        "registry": None,
        "serve": None,
        "schedule": _schedule(workdir),
    }
    if run is not None:
        alive = _alive(run)
        steps = []
        for name, s in run["steps"].items():
            state = _SHOWN.get(s["state"], s["state"])
            if state == "running" and not alive:
                state = "interrupted"
            seconds = s.get("seconds")
            if state == "running" and s.get("started"):
                seconds = time.time() - s["started"]
            steps.append(
                {
                    "step": name,
                    "state": state,
                    "started": s.get("started"),
                    "seconds": seconds,
                    "figure": figure(name, Path(s["out"])) if state == "done" else s.get("error"),
                    "out": s["out"],
                    "log": s.get("log"),
                }
            )
        out["run"] = {
            "started": run["started"],
            "finished": run.get("finished"),
            "pid": run.get("pid"),
            "running": alive and not run.get("finished"),
            "steps": steps,
        }
    if cfg.tracking.enabled and cfg.registry.enabled:
        out["registry"], out["serve"] = _registry(cfg)
    return out


def figure(step: str, out: Path) -> str | None:
    """A step's key figure from its finished output: tokens, tokens/s and loss, bits per byte, a
    decision."""

    def read(name: str) -> dict[str, Any] | None:
        try:
            return json.loads((out / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    if (m := read("train_result.json")) is not None:
        metrics = m.get("metrics", {})
        parts = [
            f"{metrics['tokens_per_s']:,.0f} tokens/s"
            if _num(metrics.get("tokens_per_s"))
            else None,
            f"loss {metrics['loss']:.3f}" if _num(metrics.get("loss")) else None,
        ]
        return ", ".join(p for p in parts if p) or None
    if (m := read("metrics.json")) is not None:
        bpb = m.get("val_bits_per_byte")
        base = m.get("base_val_bits_per_byte")
        if _num(base) and _num(bpb):
            return f"val bits/byte {base:.3f} (base) -> {bpb:.3f} (tuned)"
        return f"val bits/byte {bpb:.3f}" if _num(bpb) else None
    if (m := read("decision.json")) is not None:
        return f"{m['name']}/{m['version']} " + (
            "champion" if m.get("promoted") else "stays challenger"
        )
    if (m := read("registered.json")) is not None:
        return f"{m['name']} version {m['version']}"
    if (m := read("manifest.json")) is not None:
        splits = m.get("splits", {})
        return (
            ", ".join(
                f"{k} {v['tokens']:,} tokens"
                for k, v in splits.items()
                if isinstance(v, dict) and v.get("tokens")
            )
            or None
        )
    return None


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and x == x


def _alive(run: dict[str, Any]) -> bool:
    """Whether the process that wrote the record still runs (only knowable on its own host)."""
    if run.get("finished") or run.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(run["pid"]), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def _registry(cfg: PipelineConfig) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    from flows.tracking import Registry, RegistryError

    names = [cfg.registry.name]
    if cfg.distill.enabled:
        from flows.stages import student_registry

        names.append(student_registry(cfg).name)
    if not (Path(cfg.workdir) / "mlflow.db").is_file() and not os.environ.get(
        "MLFLOW_TRACKING_URI"
    ):
        return None, None  # nothing tracked here yet: no store to create by looking
    registry = Registry(cfg.tracking, cfg.workdir)
    models: dict[str, Any] = {}
    for name in names:
        try:
            versions = registry.versions(name)
        except RegistryError:
            models[name] = None
            continue
        models[name] = {
            alias: _version(v)
            for v in versions
            for alias in v["aliases"]
            if alias in ("champion", "challenger")
        }
        models[name]["versions"] = len(versions)
    serve = None
    champion = (models.get(cfg.registry.name) or {}).get("champion")
    if champion:
        serve = {
            "model": f"{cfg.registry.name}@champion",
            "version": champion["version"],
            "bundle": champion["bundle"],
            "url": f"http://{cfg.serve.host}:{cfg.serve.port}/v1",
        }
    return models, serve


def _version(v: dict[str, Any]) -> dict[str, Any]:
    t = v["tags"]
    return {
        "version": v["version"],
        "bits_per_byte": t.get("gptflow.eval.val_bits_per_byte"),
        "perplexity": t.get("gptflow.eval.val_perplexity"),
        "gate": t.get("gptflow.gate"),
        "stage": t.get("gptflow.stage"),
        "bundle": t.get("gptflow.bundle"),
    }


def _schedule(workdir: Path) -> list[dict[str, Any]]:
    """Every scheduler of this workdir (one per config): its last trigger and outcome, and its next
    fire time."""
    found = []
    for state_file in sorted((workdir / "schedule").glob("*/state.json")):
        try:
            s = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        last = (s.get("history") or [{}])[-1]
        stopped = bool(s.get("stopped")) and s["stopped"] >= (s.get("started") or "")
        found.append(
            {
                "state": str(state_file),
                "cron": s.get("cron"),
                "last_fire": s.get("last_fire"),
                "last_outcome": last.get("outcome"),
                "running": not stopped,
                "next_fire": None if stopped else s.get("next_fire"),
                "counts": s.get("counts", {}),
            }
        )
    return found


def render(facts: dict[str, Any]) -> str:
    """The one screen."""
    lines = [f"workdir {facts['workdir']}"]
    run = facts["run"]
    if run is None:
        lines.append("no pipeline run recorded here yet (gptflow run --workdir ...)")
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["started"]))
        lines.append(f"last run: started {when}" + (", still running" if run["running"] else ""))
        rows = [("step", "state", "started", "time", "figure")]
        for s in run["steps"]:
            started = (
                time.strftime("%H:%M:%S", time.localtime(s["started"])) if s["started"] else "-"
            )
            rows.append(
                (s["step"], s["state"], started, _dur(s["seconds"]), (s["figure"] or "")[:90])
            )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines += [
            "  " + "  ".join(f"{c:<{w}}" for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
            for r in rows
        ]
        failed = [s for s in run["steps"] if s["state"] in ("failed", "interrupted") and s["log"]]
        lines += [f"  {s['step']}'s log: {s['log']}" for s in failed]
    registry = facts["registry"]
    if registry:
        for name, m in registry.items():
            if m is None:
                lines.append(f"registry: no model {name!r} yet")
                continue
            for alias in ("champion", "challenger"):
                v = m.get(alias)
                lines.append(
                    f"registry: {name} {alias}: "
                    + (
                        f"version {v['version']}, bits/byte {_short(v['bits_per_byte'])}, "
                        f"perplexity {_short(v['perplexity'])}"
                        + (f", gate {v['gate']}" if v.get("gate") else "")
                        if v
                        else "none"
                    )
                )
    elif registry is None:
        lines.append(
            "registry: none (tracking or the registry is off, or nothing is registered yet)"
        )
    serve = facts["serve"]
    lines.append(
        f"serve would load: {serve['model']} = version {serve['version']} ({serve['bundle']}), "
        f"at {serve['url']}"
        if serve
        else "serve would load: nothing (no champion yet)"
    )
    for s in facts["schedule"]:
        lines.append(
            f"schedule{' ' + repr(s['cron']) if s['cron'] else ''}: "
            f"last trigger {s['last_fire'] or '-'}: {s['last_outcome'] or '-'}; "
            + (f"next {s['next_fire']}" if s["next_fire"] else "the scheduler is not running")
        )
    if not facts["schedule"]:
        lines.append("schedule: none configured in this workdir")
    return "\n".join(lines)


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    from flows.console import duration

    return duration(seconds) if seconds >= 10 else f"{seconds:.1f} s"


def _short(x: Any) -> str:
    try:
        return f"{float(x):.4g}"
    except (TypeError, ValueError):
        return "-"
