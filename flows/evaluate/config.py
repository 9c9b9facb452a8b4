"""The evaluate section: what the evaluate steps score and draw. Read by flows/evaluate/ (and by
promotion, which compares its figures); composed into the pipeline's config by flows/config.py."""

from __future__ import annotations

from dataclasses import dataclass

from flows.configlib import NAMES_INPUT, check, unhashed


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation of a model bundle on a dataset: the figures promotion compares, plus pictures."""

    bundle: str = unhashed("", why=NAMES_INPUT)
    """Model bundle directory to evaluate; empty means the pipeline's final model (finetune, else
    pretrain)."""
    data: str = unhashed("", why=NAMES_INPUT)
    """Dataset directory; empty means the pipeline's own preprocess output."""
    max_tokens: int = 0
    """Validation tokens to score (0: the whole val split); fixed windows in order, so
    reproducible."""
    batch_size: int = 8
    """Windows per forward pass."""
    context_length: int = 0
    """Window length in tokens (0: the model's context length)."""
    prompts: tuple[str, ...] = ("The ", "def ", "Return the ")
    """Prompts whose greedy continuations are recorded and smoke-checked."""
    max_new_tokens: int = 48
    """New tokens per prompt."""
    sample_tokens: int = 256
    """Tokens of the validation sample drawn as a per-token loss heatmap and attention maps."""
    worst_tokens: int = 25
    """Rows in the table of the tokens the model predicts worst."""
    knowledge_max_new_tokens: int = 16
    """New tokens per knowledge question (greedy) when the dataset has knowledge sources."""
    knowledge_max_questions: int = 0
    """Questions asked per group (0: all), the first by a stable hash, when the dataset has
    knowledge."""
    task_max_examples: int = 32
    """Held-out fine-tuning examples answered (greedy) and scored against their references
    (0: none)."""
    task_max_new_tokens: int = 96
    """Most new tokens per held-out answer (fewer when the references are shorter)."""

    def __post_init__(self) -> None:
        for name in ("max_tokens", "context_length"):
            check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        check(
            self.knowledge_max_questions >= 0,
            "knowledge_max_questions",
            self.knowledge_max_questions,
            ">= 0",
        )
        check(self.task_max_examples >= 0, "task_max_examples", self.task_max_examples, ">= 0")
        for name in (
            "batch_size",
            "max_new_tokens",
            "sample_tokens",
            "worst_tokens",
            "knowledge_max_new_tokens",
            "task_max_new_tokens",
        ):
            check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
