"""The MLflow pyfunc model of a gptflow bundle, logged as code ("models from code").

MLflow loads this file, not a pickle: ``mlflow.pyfunc.load_model("models:/gpt@champion")`` runs it,
and :class:`GPTPyfunc` loads the bundle from the model's ``bundle`` artifact (safetensors weights,
JSON config and tokenizer), so nothing is unpickled on the load path. It is, with flows/tracking.py,
the one file in flows that imports mlflow: MLflow itself imports it.

``predict`` takes prompts -- a list of strings, a string, a DataFrame with a ``prompt`` column, or
``{"prompt": [...]}`` -- and the generation parameters ``max_tokens``, ``temperature`` (0: greedy),
``top_p``, ``stop`` and ``seed`` as MLflow params; it returns the generated text, one per prompt.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

# Defaults of the MLflow params (the model signature's ParamSchema carries the same).
PARAMS: dict[str, Any] = {
    "max_tokens": 64,
    "temperature": 0.0,
    "top_p": 1.0,
    "stop": "",
    "seed": -1,
}
MAX_TOKENS_LIMIT = 4096


def prompts_of(model_input: Any) -> list[str]:
    """The prompts in any input shape MLflow hands a pyfunc model."""
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        if "prompt" not in model_input.columns:
            if len(model_input.columns) != 1:
                raise ValueError(
                    "input DataFrame needs a 'prompt' column, got columns "
                    f"{list(model_input.columns)}"
                )
            return [str(v) for v in model_input.iloc[:, 0].tolist()]
        return [str(v) for v in model_input["prompt"].tolist()]
    if isinstance(model_input, dict):
        if "prompt" not in model_input:
            raise ValueError(f"input needs a 'prompt' key, got {sorted(model_input)}")
        value = model_input["prompt"]
        return [value] if isinstance(value, str) else [str(v) for v in value]
    if isinstance(model_input, str):
        return [model_input]
    return [str(v) for v in model_input]


def generation_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """The MLflow params, defaulted and checked (a bad value is a ValueError naming it)."""
    p = {**PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    unknown = sorted(set(p) - set(PARAMS))
    if unknown:
        raise ValueError(f"unknown params {unknown}; known: {sorted(PARAMS)}")
    max_tokens, temperature, top_p = (
        int(p["max_tokens"]),
        float(p["temperature"]),
        float(p["top_p"]),
    )
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise ValueError(f"max_tokens={max_tokens} must be in [1, {MAX_TOKENS_LIMIT}]")
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    stop = p["stop"]
    stops = [s for s in ([stop] if isinstance(stop, str) else list(stop)) if s]
    seed = int(p["seed"])
    return {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "stop": stops,
        "seed": None if seed < 0 else seed,
    }


class GPTPyfunc(PythonModel):
    """Greedy (or sampled) text generation from the bundle in the model's ``bundle`` artifact."""

    # No list/dict type hints below: MLflow would read them as a competing signature. A DataFrame is
    # what MLflow hands `predict` under the logged signature, and a hint it infers no schema from;
    # without any hint MLflow warns "Add type hints to the `predict` method" at every log and load.
    def load_context(self, context):  # noqa: ANN001
        from gptcore import load_bundle

        self.model, self.tokenizer, self.metadata = load_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):  # noqa: ANN001
        from gptcore import generate

        g = generation_params(params)
        tok = self.tokenizer
        out = []
        for prompt in prompts_of(model_input):
            ids = generate(
                self.model,
                tok.encode(prompt) or [tok.eot_id],
                g["max_tokens"],
                temperature=g["temperature"],
                top_p=g["top_p"] if g["top_p"] < 1 else None,
                stop_ids=tok.stop_ids,
                seed=g["seed"],
            )
            text = tok.decode(ids)
            cuts = [i for i in (text.find(s) for s in g["stop"]) if i >= 0]
            out.append(text[: min(cuts)] if cuts else text)
        return out


mlflow.models.set_model(GPTPyfunc())
