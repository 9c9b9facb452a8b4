"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF) imported by gptcore against transformers' own
reading of the same file: tokenizer, chat template, logits and greedy chat answers."""

from __future__ import annotations

import pytest
import torch

from gptcore import generate
from gptcore.gguf import load_gguf

transformers = pytest.importorskip("transformers")
pytestmark = (
    pytest.mark.slow
)  # transformers needs ~10 s to read the file's tokenizer, as long again its model

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was 3:45 p.m. on 2026-12-03.",
    "def fib(n: int) -> int:\n    return n if n < 2 else "
    "fib(n - 1) + fib(n - 2)\n\tprint(f'{x=}')  # ok",
    "3.14159 1,000,000 007 x1y22z333 0xFF 1e-5",
    "日本語のテキスト、中文字符和한국어",
    "emoji 🙂👍🏽 🇫🇷 ❤️‍🔥",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<repo_name>gptflow<filename>README.md",
    "  leading\n\n\nnewlines   trailing  \r\n",
    "Ünïcödé àéîõü Straße don't I'll we've",
    "<|im_start|",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of Spain?"},
    ],
]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return load_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def ref_tok(smollm2_gguf):
    return transformers.AutoTokenizer.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name
    )


@pytest.fixture(scope="module")
def ref_model(smollm2_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


def test_metadata_is_smollm2(ours):
    model, tok = ours
    c = model.config
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.mlp_hidden) == (30, 576, 9, 3, 1536)
    assert c.tie_embeddings and c.rope_theta == 1e5 and c.vocab_size == 49152
    assert tok.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert tok.stop_ids == (2, 0)  # <|im_end|> (eos, end of turn), then <|endoftext|>


def test_tokenizer_encodes_and_decodes_like_transformers(ours, ref_tok):
    _, tok = ours
    for text in TEXTS:
        ids = ref_tok(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == ref_tok.decode(ids), text


def test_chat_template_renders_like_transformers(ours, ref_tok):
    _, tok = ours
    for messages in CHATS:
        for prompt in (True, False):
            assert tok.apply_chat_template(
                messages, add_generation_prompt=prompt
            ) == ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    assert "You are a helpful AI assistant named SmolLM" in tok.apply_chat_template(CHATS[0])


def test_logits_and_greedy_chat_answers_match_transformers(ours, ref_model, ref_tok):
    model, tok = ours
    for messages in CHATS:
        ids = tok.encode(tok.apply_chat_template(messages))
        assert (
            ids
            == ref_tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        with torch.no_grad():
            torch.testing.assert_close(
                model(torch.tensor([ids]))[0],
                ref_model(torch.tensor([ids])).logits,
                atol=1e-3,
                rtol=1e-4,
            )
        answer = generate(model, ids, 48, stop_ids=tok.stop_ids)
        theirs = ref_model.generate(
            torch.tensor([ids]),
            max_new_tokens=48,
            do_sample=False,
            eos_token_id=list(tok.stop_ids),
            pad_token_id=2,
        )[0, len(ids) :].tolist()
        assert answer == [t for t in theirs if t not in tok.stop_ids]
        assert (
            len(answer) < 48 and theirs[len(answer)] in tok.stop_ids
        )  # the turn ended: a stop token came
    answer = tok.decode(
        generate(model, tok.encode(tok.apply_chat_template(CHATS[0])), 48, stop_ids=tok.stop_ids)
    )
    assert answer == "The capital of France is Paris."
