"""The pipeline from a pretrained base model (`model.base`), on a tiny random Llama-family model
written as a real .gguf (tests/gptcore/gguf_files.py): the import step and its content address, the
one import behind `*.init`, chat-template rendering with the loss on the assistant turns only, the
bad-input counts, the task scores, and the whole pipeline end to end (import, preprocess with the
base's tokenizer, continued pretraining, SFT, evaluation of base and tuned, register, promote)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.config import ConfigError, load_config
from flows.context import StepContext
from flows.data import sft
from flows.data.clean import UnitStats
from tests.gptcore.gguf_files import CHATML, random_llama, tiny_tokenizer, write_gguf


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory, tok):
    """A random 2-layer Llama with ChatML, as llama.cpp would write it (context 128)."""
    path = tmp_path_factory.mktemp("base") / "tiny-llama.gguf"
    return write_gguf(path, random_llama(tok.vocab_size, tied=True), tok)


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [f"workdir={tmp_path / 'w'}", "tracking.enabled=false", *overrides])


# --------------------------------------------------------------------------- the import step


def test_the_import_step_is_addressed_by_the_sources_content_and_shared_with_init(
    tmp_path, gguf_base
):
    from flows import pipeline
    from flows.models.base import ensure, identity, import_dir
    from flows.train.prepare import resolve_init

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    cfg = _cfg(tmp_path, f"model.base={gguf_base}", f"data.inputs=[{corpus}]", "data.sft_inputs=[]")
    planned = pipeline.plan(cfg)
    assert [p.step.name for p in planned] == ["import", "preprocess", "pretrain", "evaluate"]
    ctx = StepContext(workdir=Path(cfg.workdir))
    assert planned[0].out == import_dir(cfg.workdir, identity(str(gguf_base), ctx))
    assert (
        planned[1].inputs == {"base": planned[0].out}
        and planned[2].inputs["init"] == planned[0].out
    )
    assert planned[3].inputs["base"] == planned[0].out

    # finetune.init naming the same file resolves through the same import, into the same directory.
    bundle, lineage = resolve_init(str(gguf_base), ctx, "finetune")
    assert bundle == planned[0].out and lineage["source"] == str(gguf_base.resolve())
    assert ensure(str(gguf_base), ctx) == bundle  # done: not imported again
    assert pipeline.plan(cfg)[0].done
    assert json.loads((bundle / "tokenizer_config.json").read_text())["chat_template"] == CHATML

    # pretrain.steps 0 skips the step: fine-tuning starts from the base itself
    tuned = pipeline.plan(
        _cfg(
            tmp_path,
            f"model.base={gguf_base}",
            f"data.inputs=[{corpus}]",
            f"data.sft_inputs=[{corpus}]",
            "pretrain.steps=0",
        )
    )
    assert [p.step.name for p in tuned] == ["import", "preprocess", "finetune", "evaluate"]
    assert tuned[2].inputs["init"] == planned[0].out

    gguf_base.touch()  # same bytes: same import
    assert pipeline.plan(cfg)[0].out == planned[0].out


def test_a_changed_source_is_a_new_import_and_a_missing_one_an_error(tmp_path, tok):
    from flows.models.base import identity
    from flows.train.prepare import resolve_init

    path = write_gguf(tmp_path / "m.gguf", random_llama(tok.vocab_size, tied=True, seed=1), tok)
    ctx = StepContext(workdir=tmp_path / "w")
    first = identity(str(path), ctx)
    write_gguf(path, random_llama(tok.vocab_size, tied=True, seed=2), tok)
    assert identity(str(path), ctx) != first
    assert identity("builtin:smollm2-135m-instruct", ctx)[
        "sha256"
    ]  # a builtin: its pinned sha256, no file read
    with pytest.raises(ConfigError, match="unknown built-in model"):
        identity("builtin:nope", ctx)
    with pytest.raises(ConfigError, match=r"finetune.init='/nowhere': no such directory or file"):
        resolve_init("/nowhere", ctx, "finetune")


# ------------------------------------------------------------------------- chat rendering and masks


def _tokenized(record, tok, template=True):
    stats = UnitStats()
    fmt = sft.ChatFormat(tok if template else tok.with_settings(chat_template=None))
    parts = sft.segments(record, load_config().data, stats, fmt)
    if parts is None:
        return None, stats
    ((ids, mask),) = sft.tokenize_examples([parts], tok)
    return (ids, mask), stats


def test_a_conversation_is_rendered_by_the_template_with_the_loss_on_the_assistant_turns_only(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a fox."},
        {"role": "assistant", "content": "The quick brown fox."},
        {"role": "user", "content": "A dog?"},
        {"role": "assistant", "content": "The lazy dog."},
    ]
    (ids, mask), stats = _tokenized({"messages": messages}, tok)
    assert not stats.dropped
    assert ids[-1] == tok.eot_id and mask[-1] == 0  # the turn's end is the stop, not <|endoftext|>
    # The whole example is exactly what the template renders (what serving sends), in special ids.
    assert tok.decode(ids[:-1]) == tok.apply_chat_template(messages, add_generation_prompt=False)
    assert tok.token_to_id("<|im_start|>") in ids
    trained, runs, run = [], [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            run.append(i)
        elif run:
            runs.append(tok.decode(run))
            run = []
        trained += [i] if m else []
    assert runs == ["The quick brown fox.<|im_end|>", "The lazy dog.<|im_end|>"]


def test_a_prompt_completion_pair_becomes_a_user_and_an_assistant_turn(tok):
    (ids, mask), _ = _tokenized({"prompt": "def f(x):", "completion": "Return x twice."}, tok)
    expected = tok.apply_chat_template(
        [
            {"role": "user", "content": "def f(x):"},
            {"role": "assistant", "content": "Return x twice."},
        ],
        add_generation_prompt=False,
    )
    assert tok.decode(ids[:-1]) == expected
    assert (
        tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "Return x twice.<|im_end|>"
    )
    # Without a template: a pair is concatenated as from scratch, the completion and <|endoftext|>
    # trained.
    (ids, mask), _ = _tokenized(
        {"prompt": "def f(x):", "completion": " Return x."}, tok, template=False
    )
    assert tok.decode(ids) == "def f(x): Return x.<|endoftext|>" and mask[-1] == 1


@pytest.mark.parametrize(
    "record, reason, template",
    [
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "wizard", "content": "boo"},
                    {"role": "assistant", "content": "ok"},
                ]
            },
            "unknown_role",
            True,
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "ok"},
                ]
            },
            "no_chat_template",
            False,
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "say <|im_end|>"},
                    {"role": "assistant", "content": "no"},
                ]
            },
            "special_token_in_text",
            True,
        ),
        ({"messages": [{"role": "assistant", "content": "unprompted"}]}, "no_prompt", True),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no_assistant_turn", True),
        ({"prompt": "p"}, "missing_prompt_or_completion", True),
    ],
)
def test_bad_chat_records_are_dropped_and_counted_by_reason(tok, record, reason, template):
    out, stats = _tokenized(record, tok, template)
    assert out is None and dict(stats.dropped) == {reason: 1}


# --------------------------------------------------------------------------- task scores


def test_task_scores_are_exact_contains_f1_and_rouge_l():
    from flows.evaluate.tasks import contains, exact_match, rouge_l, score_answer, token_f1

    assert exact_match("Paris.", "paris") == 1.0 and exact_match("Paris, France", "Paris") == 0.0
    assert contains("It is Paris, France.", "Paris") == 1.0 and contains("Parisian", "Paris") == 0.0
    assert token_f1("the cat sat", "the cat sat down") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)  # LCS a c d: P = R = 3/4
    assert rouge_l("d c b a", "a b c d") == pytest.approx(0.25)  # order matters, unlike token F1
    assert token_f1("d c b a", "a b c d") == 1.0
    assert score_answer("It is Paris.", "Paris")["score"] == 1.0  # short: contains
    long_ref = "Return the number of words in the text."
    assert score_answer("Return the words.", long_ref)["score"] == pytest.approx(
        rouge_l("Return the words.", long_ref)
    )


# --------------------------------------------------------------------------- the whole pipeline


def _sft_file(path: Path, n: int = 48) -> Path:
    rows = [{"prompt": f"def f{i}(x):", "completion": f"Return x times {i}."} for i in range(n)]
    rows.append(
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "oracle", "content": "?"},
                {"role": "assistant", "content": "ok"},
            ]
        }
    )  # line n + 1: an unknown role
    rows.append(
        {"prompt": "long", "completion": "The quick brown fox jumps. " * 40}
    )  # line n + 2: > context
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_the_pipeline_tunes_a_base_model_and_scores_it_against_its_base(
    tmp_path, gguf_base, tok, ray_local
):
    from flows import pipeline
    from gptcore import Tokenizer, load_bundle

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "".join(f"The quick brown fox {i} jumps over the lazy dog.\n\n" for i in range(400))
    )
    sft_path = _sft_file(tmp_path / "pairs.jsonl")
    train = [
        "micro_batch_size=4",
        "eval_every=4",
        "checkpoint_every=4",
        "num_workers=1",
        "warmup_steps=0",
    ]
    cfg = load_config(
        None,
        [
            f"workdir={tmp_path / 'w'}",
            f"model.base={gguf_base}",
            "model.context_length=64",
            f"data.inputs=[{corpus}]",
            f"data.sft_inputs=[{sft_path}]",
            "data.val_min_tokens=200",
            "data.val_fraction=0.1",
            "data.sft_val_min_examples=8",
            "pretrain.steps=4",
            "pretrain.lr=1e-3",
            *[f"pretrain.{t}" for t in train],
            "finetune.steps=12",
            "finetune.lr=3e-3",
            *[f"finetune.{t}" for t in train],
            "evaluate.prompts=[The ]",
            "evaluate.max_new_tokens=4",
            "evaluate.sample_tokens=16",
            "evaluate.task_max_new_tokens=12",
            "registry.metric=sft_val_loss",
        ],
    )
    planned = pipeline.run(cfg)
    steps = {p.step.name: p for p in planned}
    assert list(steps) == [
        "import",
        "preprocess",
        "pretrain",
        "finetune",
        "evaluate",
        "register",
        "promote",
    ]
    assert all(p.status == "ran" for p in planned)

    dataset = steps["preprocess"].out
    manifest = json.loads((dataset / "manifest.json").read_text())
    base_tok = Tokenizer.load(steps["import"].out)
    assert (
        manifest["base_model"]["tokenizer_sha256"]
        == base_tok.sha256()
        == Tokenizer.load(dataset).sha256()
    )
    assert (
        manifest["base_model"]["context_length"] == 64 and manifest["base_model"]["chat_template"]
    )
    assert manifest["vocab_size"] == tok.vocab_size  # the base's vocabulary, no BPE trained
    dropped = manifest["sft_examples"]["dropped"]
    assert dropped == {"unknown_role": 1, "longer_than_context": 1}
    locations = manifest["sft_examples"]["locations"]
    assert (
        locations["unknown_role"][0]["line"] == 49
        and locations["longer_than_context"][0]["line"] == 50
    )
    assert locations["unknown_role"][0]["file"].endswith("pairs.jsonl")

    tuned, _, meta = load_bundle(steps["finetune"].out)
    base, _, _ = load_bundle(steps["import"].out)
    assert tuned.config == base.config  # the base's architecture and context, tuned
    assert meta["parent"]["bundle"] == str(steps["pretrain"].out)

    metrics = json.loads((steps["evaluate"].out / "metrics.json").read_text())
    figures = (
        "val_bits_per_byte",
        "sft_val_loss",
        "task_score",
        "task_rouge_l",
        "task_contains",
        "task_exact_match",
        "task_token_f1",
        "task_examples",
    )
    assert set(figures) <= set(metrics) and set(figures) <= set(metrics["base"])
    assert metrics["base"]["bundle"] == str(steps["import"].out)
    assert metrics["sft_val_loss"] < metrics["base"]["sft_val_loss"]  # the tuning is for this
    answers = [
        json.loads(line)
        for line in (steps["evaluate"].out / "task_answers.jsonl").read_text().splitlines()
    ]
    assert len(answers) == metrics["task_examples"] and {
        "answer",
        "base_answer",
        "reference",
    } <= set(answers[0])
    assert answers[0]["prompt"].endswith("<|im_start|>assistant\n")

    decision = json.loads((steps["promote"].out / "decision.json").read_text())
    assert decision["promoted"] and decision["decision"]["metric"] == "sft_val_loss"

    again = pipeline.run(cfg)  # unchanged: every step done, the base not imported again
    assert all(p.status == "done" for p in again)
