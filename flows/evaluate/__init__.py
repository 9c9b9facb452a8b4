"""Evaluation: validation loss, perplexity and bits per byte, held-out fine-tuning loss,
fixed-prompt generations with smoke checks, and interpretability artifacts (per-token loss,
attention maps, worst tokens, gradient x input attribution).

:func:`flows.evaluate.stage.evaluate` is the pipeline stage; :func:`flows.evaluate.explain.explain`
draws the interpretability artifacts for any text and bundle, e.g. from a notebook. (Nothing is
imported here: flows.evaluate.config, which flows/config.py reads, must load without torch.)
"""
