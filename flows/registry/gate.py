"""The promotion gate: a pure function of two evaluations and a margin. No MLflow here.

A challenger becomes champion when there is no champion yet, or when it passed its smoke checks and
is better than the champion *on the same data* by at least the margin: its bits per byte (or
perplexity) is at most ``(1 - margin)`` times the champion's. Bits per byte is the default because
it compares models with different tokenizers (the champion is then scored on the same text).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

Metric = Literal["bits_per_byte", "perplexity", "sft_val_loss"]


@dataclass(frozen=True)
class Figures:
    """One model's evaluation on the gate's data."""

    bits_per_byte: float
    perplexity: float
    smoke_passed: bool = True
    smoke_checked: bool = True
    """False when there were no prompts to check (evaluate.prompts empty): said in the decision."""
    sft_val_loss: float = float("nan")
    """Mean loss on the held-out fine-tuning examples' answers (NaN: the data has none)."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    metric: Metric
    challenger: float
    champion: float | None
    margin: float

    def tags(self) -> dict[str, str]:
        """What the version records about the decision (``gptflow.gate=passed|refused`` and
        figures)."""
        out = {
            "gptflow.gate": "passed" if self.promote else "refused",
            "gptflow.gate.reason": self.reason,
            "gptflow.gate.metric": self.metric,
            "gptflow.gate.challenger": f"{self.challenger:.6g}",
            "gptflow.gate.margin": str(self.margin),
        }
        if self.champion is not None:
            out["gptflow.gate.champion"] = f"{self.champion:.6g}"
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    challenger: Figures,
    champion: Figures | None,
    margin: float = 0.01,
    metric: Metric = "bits_per_byte",
) -> Decision:
    """Whether `challenger` replaces `champion` (None: there is none yet)."""
    if not 0 <= margin < 1:
        raise ValueError(f"margin={margin} must be in [0, 1)")
    ours = getattr(challenger, metric)
    if not challenger.smoke_passed:
        return Decision(
            False,
            "the challenger failed its smoke checks",
            metric,
            ours,
            getattr(champion, metric) if champion else None,
            margin,
        )
    if not math.isfinite(ours):
        return Decision(
            False,
            f"the challenger's {metric} is not finite ({ours})",
            metric,
            ours,
            getattr(champion, metric) if champion else None,
            margin,
        )
    if not challenger.smoke_checked:
        decision = decide(
            dataclasses.replace(challenger, smoke_checked=True), champion, margin, metric
        )
        return dataclasses.replace(
            decision, reason=f"{decision.reason}; smoke checks: not checked (no prompts)"
        )
    if champion is None:
        return Decision(True, "first model: there is no champion yet", metric, ours, None, margin)
    theirs = getattr(champion, metric)
    if not math.isfinite(theirs):  # else NaN would refuse every challenger forever
        return Decision(
            True,
            f"the champion's {metric} is not finite ({theirs}): the challenger's finite "
            f"{ours:.4f} replaces it",
            metric,
            ours,
            theirs,
            margin,
        )
    needed = (1 - margin) * theirs
    if ours <= needed:
        return Decision(
            True,
            f"{metric} {ours:.4f} <= {needed:.4f} (champion {theirs:.4f} less {margin:.1%})",
            metric,
            ours,
            theirs,
            margin,
        )
    return Decision(
        False,
        f"{metric} {ours:.4f} is not below {needed:.4f} (champion {theirs:.4f} less {margin:.1%})",
        metric,
        ours,
        theirs,
        margin,
    )
