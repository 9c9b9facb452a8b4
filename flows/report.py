"""What `gptflow run` (and `gptflow distill`) prints when the pipeline ends: the step table, the
evaluation figures, the final model's (and a distilled student's) answers to the evaluation prompts,
where the MLflow runs are, and (last line) the final model bundle directory, so shell scripts can
still take it with ``tail -n 1``.

Everything here is read back from the steps' finished outputs; nothing is computed again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from flows.config import PipelineConfig
from flows.pipeline import PlannedStep, describe, step_output


def run_report(cfg: PipelineConfig, planned: list[PlannedStep]) -> str:
    lines = [describe(planned), ""]
    lines += _model(cfg, planned, "evaluate", "promote", "the final model")
    lines += _model(
        cfg, planned, "distill_evaluate", "distill_promote", "the distilled student", student=True
    )
    lines += _tracking(cfg)
    final = (
        step_output(planned, "finetune")
        or step_output(planned, "pretrain")
        or step_output(planned, "import")
    )
    lines.append(str(final) if final is not None else str(planned[-1].out))
    return "\n".join(lines)


def distill_report(cfg: PipelineConfig, planned: list[PlannedStep]) -> str:
    """What `gptflow distill` prints: its steps, the student's figures and registry decision, and
    (last line) the student's bundle directory."""
    lines = [describe(planned), ""]
    lines += _model(
        cfg, planned, "distill_evaluate", "distill_promote", "the distilled student", student=True
    )
    lines += _tracking(cfg)
    lines.append(str(step_output(planned, "distill")))
    return "\n".join(lines)


def _model(
    cfg: PipelineConfig,
    planned: list[PlannedStep],
    evaluate: str,
    promote: str,
    what: str,
    student: bool = False,
) -> list[str]:
    """One model's evaluation figures, answers and registry decision, from its steps' outputs."""
    lines: list[str] = []
    evaluated = step_output(planned, evaluate)
    if evaluated is not None and (evaluated / "metrics.json").is_file():
        lines += _evaluation(evaluated, what)
    promoted = step_output(planned, promote)
    if promoted is not None and (promoted / "decision.json").is_file():
        d = json.loads((promoted / "decision.json").read_text(encoding="utf-8"))
        verdict = "champion" if d["promoted"] else "challenger (the gate refused it)"
        model = f" --model {d['name']}@champion" if student else ""
        lines += [
            f"registry: {d['name']} version {d['version']} is {verdict}: {d['reason']}",
            f"  gptflow models {d['name']}    gptflow lineage {d['name']}@champion",
            f"serve the champion (OpenAI API at http://{cfg.serve.host}:{cfg.serve.port}/v1, "
            "playground at /):",
            f"  gptflow serve --workdir {cfg.workdir}{model}",
            "",
        ]
    return lines


# The figures shown as base -> tuned when the evaluation scored the base too.
_BASE_FIGURES = (
    ("val_bits_per_byte", "validation bits/byte"),
    ("sft_val_loss", "held-out fine-tuning loss"),
    ("task_score", "held-out task score"),
    ("task_rouge_l", "held-out ROUGE-L"),
    ("task_contains", "held-out contains"),
)


_SHOWN_ANSWERS = 3


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _evaluation(out: Path, what: str) -> list[str]:
    m: dict[str, Any] = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    lines = [f"evaluation of {what} ({out / 'metrics.json'}):"]
    if m.get("val_loss") is not None:
        lines.append(
            f"  validation: {m['val_loss']:.3f} nats/token, perplexity {m['val_perplexity']:.1f}, "
            f"{m['val_bits_per_byte']:.3f} bits/byte over {int(m['val_tokens']):,} tokens"
        )
    if m.get("sft_val_loss") is not None:
        lines.append(
            f"  held-out fine-tuning loss: {m['sft_val_loss']:.3f} nats/token "
            f"(perplexity {math.exp(min(m['sft_val_loss'], 50.0)):.1f}) "
            f"over {int(m['sft_val_tokens']):,} completion tokens"
        )
    if m.get("task_examples"):
        lines.append(
            f"  held-out answers ({int(m['task_examples'])}): task score {m['task_score']:.3f} "
            f"(exact {m['task_exact_match']:.2f}, contains {m['task_contains']:.2f}, "
            f"ROUGE-L {m['task_rouge_l']:.3f}, token F1 {m['task_token_f1']:.3f})"
        )
    base = m.get("base") or {}
    shown = [
        (k, label)
        for k, label in _BASE_FIGURES
        if isinstance(base.get(k), float) and isinstance(m.get(k), float)
    ]
    if shown:
        lines.append(f"  base -> tuned (base {base.get('bundle')}):")
        for k, label in shown:
            better = (m[k] < base[k]) if k.endswith(("loss", "bits_per_byte")) else (m[k] > base[k])
            verdict = "better" if better else "not better"
            lines.append(f"    {label:<28} {base[k]:8.4f} -> {m[k]:8.4f}  {verdict}")
    if (out / "task_answers.jsonl").is_file():
        rows = [
            json.loads(line)
            for line in (out / "task_answers.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        lines.append(
            "  held-out prompts (reference, then the base's and the tuned model's answers):"
        )
        for row in rows[:_SHOWN_ANSWERS]:
            lines.append(f"    prompt: ...{_one_line(row['prompt'])[-100:]}")
            lines.append(f"      reference: {_one_line(row['reference'])[:160]}")
            if "base_answer" in row:
                lines.append(f"      base:      {_one_line(row['base_answer'])[:160]}")
            lines.append(f"      tuned:     {_one_line(row['answer'])[:160]}")
        lines.append(f"    every held-out answer: {out / 'task_answers.jsonl'}")
    if m.get("knowledge"):
        from flows.evaluate.knowledge import summary_lines

        lines += summary_lines(m["knowledge"], m.get("base", {}).get("knowledge"))
        lines.append(f"    every answer: {out / 'knowledge_answers.csv'}")
    for key, why in m.get("notes", {}).items():
        lines.append(f"  note: {key}: {why}")
    gens_file = out / "generations.json"
    if gens_file.is_file():
        gens = json.loads(gens_file.read_text(encoding="utf-8"))
        records = gens["generations"]
        passed = m.get("smoke_passed")
        from flows.evaluate.stage import SMOKE_WORDS

        lines.append(f"  smoke checks on the generations: {SMOKE_WORDS.get(passed, 'FAILED')}")
        lines.append(f"greedy answers of {what}:")
        for g in records:
            answer = g["text"].strip().replace("\n", " ")
            lines.append(f"  {g['prompt'].strip()!s}\n    -> {answer[:200]}")
    lines.append(f"  pictures: {out}/loss_heatmap.html, attention.png, worst_tokens.md")
    lines.append("")
    return lines


def _tracking(cfg: PipelineConfig) -> list[str]:
    if not cfg.tracking.enabled:
        return ["MLflow: tracking is off", ""]
    from flows.tracking import tracking_uri

    uri = tracking_uri(cfg.tracking, cfg.workdir)
    return [
        f"MLflow: experiment {cfg.tracking.experiment!r} in {uri}",
        f"  open the UI: mlflow ui --backend-store-uri {uri}",
        "",
    ]
