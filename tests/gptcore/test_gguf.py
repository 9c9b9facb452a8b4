"""GGUF import against transformers' own GGUF loader, on small files written here by gguf.GGUFWriter
from random LlamaForCausalLMs (F32, F16, Q8_0, Q4_0, Q5_1; tied and untied; GQA and MHA): the
same tensors, the same logits, the same tokenizer; bad files are refused by name."""

from __future__ import annotations

import pytest
import torch

from gptcore import generate
from gptcore.gguf import load_gguf, read_gguf
from tests.gptcore.gguf_files import random_llama, tiny_tokenizer, write_gguf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


CASES = [  # (qtype, tied, kv_heads, rope_theta); Q4_0/Q5_1 need rows of 32: hidden 64
    ("F32", True, 2, 1e4),
    ("F32", False, 4, 5e5),
    ("Q8_0", False, 2, 1e4),
    ("Q8_0", True, 1, 1e5),
    ("F16", True, 2, 1e4),
    ("Q4_0", False, 2, 1e4),
    ("Q5_1", True, 4, 1e4),
]


@pytest.mark.parametrize("qtype,tied,kv_heads,theta", CASES)
def test_gguf_imports_like_transformers_gguf_loader(tmp_path, tok, qtype, tied, kv_heads, theta):
    hf = random_llama(tok.vocab_size, tied, kv_heads=kv_heads, rope_theta=theta)
    write_gguf(tmp_path / "m.gguf", hf, tok, qtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()

    g = read_gguf(tmp_path / "m.gguf")
    expected = {k: v for k, v in ref.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert set(g.tensors) == set(expected)
    for name, tensor in g.tensors.items():
        assert torch.equal(tensor, expected[name].float()), name
    assert g.hf_config["tie_word_embeddings"] is tied
    assert g.hf_config["num_key_value_heads"] == kv_heads

    model, _ = load_gguf(tmp_path / "m.gguf")
    assert model.config.tie_embeddings is tied
    ids = torch.randint(0, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = ref(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    greedy = generate(model, ids[0].tolist(), 16)
    ref_out = ref.generate(
        ids[:1], max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert greedy == ref_out[0, ids.shape[1] :].tolist()


def test_gguf_tokenizer_is_transformers_tokenizer_of_the_file(tmp_path, tok):
    write_gguf(tmp_path / "m.gguf", random_llama(tok.vocab_size, True), tok)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    ours = read_gguf(tmp_path / "m.gguf").tokenizer
    for text in [
        "The quick brown fox.",
        "def f(x):\n    return x * 2",
        "12345 67890",
        "日本語 🙂",
        "<|im_start|>user\nhi<|im_end|>\n",
        "<|endoftext|>tail",
        "  spaces  ",
    ]:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    assert ours.special_tokens == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
    }
    assert ours.stop_ids == (2, 0)  # eos = end of turn, then <|endoftext|>
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_bad_gguf_files_are_refused_by_name(tmp_path, tok):
    good = write_gguf(tmp_path / "good.gguf", random_llama(tok.vocab_size, True), tok)
    data = good.read_bytes()
    cases = {
        "truncated.gguf": (data[: len(data) // 2], "truncated or corrupt"),
        "magic.gguf": (b"XXXX" + data[4:], "truncated or corrupt"),
        "empty.gguf": (b"", "truncated or corrupt"),
    }
    for name, (content, expect) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=expect) as e:
            read_gguf(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)
    hf = random_llama(tok.vocab_size, True)
    bad = {
        "qwen.gguf": (
            {"arch": "qwen2"},
            "architecture 'qwen2' is not supported; gptcore reads llama",
        ),
        "q81.gguf": (
            {"raw": {"blk.0.attn_q.weight": "Q8_1"}},
            "Q8_1, which the gguf package cannot dequantize",
        ),
        "vocab.gguf": (
            {"extra_tokens": ("<extra>",)},
            f"tokenizer has {tok.vocab_size + 1} tokens but "
            f"token_embd.weight has {tok.vocab_size} rows",
        ),
        "pre.gguf": ({"pre": "falcon"}, "tokenizer.ggml.pre 'falcon' is not supported"),
    }
    for name, (kwargs, expect) in bad.items():
        write_gguf(tmp_path / name, hf, tok, **kwargs)
        with pytest.raises(ValueError, match=expect) as e:
            read_gguf(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)
