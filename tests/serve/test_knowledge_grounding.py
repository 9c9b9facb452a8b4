"""Grounded answers (serve.knowledge): BM25 over a dataset's verbalised facts, and the server
putting the facts that match a question into its prompt and naming them in the response, over real
HTTP."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from flows.config import ConfigError, PipelineConfig, ServeConfig, TrackingConfig, build
from flows.data import knowledge
from flows.serve.deploy import settings_for
from flows.serve.grounding import Grounder, ground_messages
from flows.workdir import FingerprintCache
from gptcore import load_bundle
from tests.knowledge_helpers import NUMBER, SYMBOL, make_db, rdf_source, sql_source
from tests.serve.conftest import make_bundle


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A dataset directory holding the knowledge tables of the elements database and the capitals
    graph."""
    root = tmp_path_factory.mktemp("grounding")
    data = build(
        PipelineConfig,
        {
            "data": {
                "knowledge": [
                    sql_source(make_db(root / "elements.db"), (SYMBOL, NUMBER)),
                    rdf_source(),
                ]
            }
        },
        "<test>",
    ).data
    built = knowledge.materialize(data, root / "k", FingerprintCache(None))
    out = root / "dataset"
    (out / "knowledge").mkdir(parents=True)
    for table in built.tables:
        shutil.copyfile(table, out / "knowledge" / table.name)
    return out


def test_bm25_finds_the_fact_a_question_is_about(dataset):
    g = Grounder.from_dataset(dataset)
    best = g.retrieve("What is the chemical symbol of Silicon?", 3)
    assert best[0]["text"] == "The chemical symbol of Silicon is Si. Silicon has atomic number 14."
    assert (
        g.retrieve("Which city is the capital of Kenya?", 1)[0]["text"]
        == "The capital of Kenya is Nairobi."
    )
    assert g.retrieve("???", 3) == [] and g.retrieve("zebra quantum", 3) == []
    messages, used = ground_messages([{"role": "user", "content": "capital of Norway?"}], g, 2)
    assert messages[0] == {
        "role": "system",
        "content": "Facts:\n" + "\n".join(f["text"] for f in used),
    }
    assert (
        "The capital of Norway is Oslo." in messages[0]["content"] and messages[1]["role"] == "user"
    )


def test_serving_knowledge_needs_a_dataset_with_facts(tmp_path, tok):
    bundle = make_bundle(tmp_path / "b", tok, seed=1)  # its metadata names no dataset
    cfg = PipelineConfig(
        workdir=str(tmp_path),
        serve=ServeConfig(knowledge=True),
        tracking=TrackingConfig(enabled=False),
    )
    with pytest.raises(
        ConfigError, match="serve.knowledge: the dataset of .* has no knowledge/facts.jsonl"
    ):
        settings_for(cfg, bundle=str(bundle))


@pytest.mark.slow
def test_the_server_grounds_chat_answers_and_names_the_facts_used(deploy, dataset, tok, tmp_path):
    from gptcore import save_bundle

    model, _, _ = load_bundle(make_bundle(tmp_path / "plain", tok, seed=2))
    bundle = save_bundle(
        tmp_path / "bundle", model, tok, {"dataset": str(dataset)}
    )  # as training writes it
    url = deploy(
        "knowledge", tmp_path, bundle=bundle, served_name="tiny", knowledge=True, knowledge_top_k=2
    )
    question = "What is the capital of Japan?"
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 4}
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        answer = json.loads(r.read())
    facts = answer["knowledge"]["facts"]
    assert facts[0]["text"] == "The capital of Japan is Tokyo." and len(facts) <= 2
    japan = next(
        f
        for f in knowledge.read_jsonl(dataset / "knowledge" / "facts.jsonl")
        if f["fields"].get("subject") == "Japan"
    )
    assert facts[0]["id"] == japan["id"]  # the row used, by its id in facts.jsonl
    # The facts were in the prompt the model read, exactly as evaluation's grounded prompt has them.
    prompt = knowledge.question_prompt(question, [f["text"] for f in facts])
    assert answer["usage"]["prompt_tokens"] == len(tok.encode(prompt))
    # Streamed, the first event names the facts.
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        first = next(line for line in r.read().decode().splitlines() if line.startswith("data: "))
    assert json.loads(first.removeprefix("data: "))["knowledge"]["facts"] == facts
