"""Evaluation: validation loss, perplexity and bits per byte, held-out fine-tuning loss, fixed-prompt
generations with smoke checks, and interpretability artifacts (per-token loss, attention maps,
worst tokens, gradient x input attribution).

:func:`evaluate` is the pipeline stage; :func:`explain` draws the interpretability artifacts for
any text and bundle, e.g. from a notebook.
"""

from flows.evaluate.explain import explain
from flows.evaluate.stage import evaluate

__all__ = ["evaluate", "explain"]
