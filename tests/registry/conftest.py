"""A real MLflow store (sqlite) with registered versions of bundles of known quality."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from flows.config import EvaluateConfig, RegistryConfig, TrackingConfig
from flows.context import StepContext
from flows.evaluate.stage import evaluate
from flows.registry.register import RESULT, register
from flows.tracking import Registry, stage_run
from gptcore import Tokenizer, save_bundle
from tests.evaluate.conftest import corpus, tiny_model, train_briefly, write_dataset

EVAL = EvaluateConfig(max_new_tokens=4, sample_tokens=16, prompts=("The ",))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus(300, seed=0), vocab_size=300)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tok) -> dict:
    """A workdir with an MLflow sqlite store and a dataset; register(bundle) -> version."""
    root = tmp_path_factory.mktemp("registry")
    tracking = TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}")
    dataset = write_dataset(root / "dataset", tok, val=corpus(12, seed=2))

    def add(bundle: Path, name: str = "gpt") -> str:
        ctx = StepContext(workdir=root, tracking=tracking)
        with stage_run(tracking, root, "evaluate") as tracker:
            evaluation = evaluate(EVAL, bundle, dataset, root / "eval" / bundle.name, tracker)
        out = root / "register" / bundle.name
        out.mkdir(parents=True, exist_ok=True)
        with stage_run(tracking, root, "register") as tracker:
            register(
                RegistryConfig(name=name),
                bundle,
                evaluation,
                dataset,
                out,
                dataclasses.replace(ctx, tracker=tracker, step_runs={"evaluate": tracker.run_id}),
            )
        return json.loads((out / RESULT).read_text())["version"]

    return {
        "root": root,
        "tracking": tracking,
        "dataset": dataset,
        "add": add,
        "registry": lambda: Registry(tracking, root),
    }


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tok) -> dict[str, Path]:
    """Three bundles of one tokenizer: untrained (worst), briefly trained, trained longer (best)."""

    def make(name: str, steps: int) -> Path:
        model = tiny_model(tok.vocab_size, seed=1)
        if steps:
            train_briefly(model, tok, steps)
        return save_bundle(tmp_path_factory.mktemp(name), model, tok, {"stage": "pretrain"})

    return {"worst": make("worst", 0), "good": make("good", 40), "best": make("best", 150)}


@pytest.fixture(scope="module")
def registered(store, bundles) -> Callable[[str], str]:
    cache: dict[str, str] = {}

    def get(which: str) -> str:
        if which not in cache:
            cache[which] = store["add"](bundles[which])
        return cache[which]

    return get
