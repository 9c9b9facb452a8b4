"""Small real .gguf files for the tests: a random transformers LlamaForCausalLM written the way
llama.cpp's convert_hf_to_gguf.py writes one (names, Q/K row permutation, metadata, tokenizer),
with gguf.GGUFWriter, so transformers' own GGUF loader is the reference that reads them back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gptcore import Tokenizer

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = (
    "The quick brown fox jumps over the lazy dog. " * 20
    + "def f(x):\n    return x * 2\n" * 10
    + "Numbers 12345 and 67890. Ünïcödé text, 日本語, emoji 🙂. " * 10
)


def tiny_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE trained here, with ChatML's special tokens at ids 0, 1, 2."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        [TEXT],
        trainer=trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIALS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return Tokenizer(hf, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHATML)


def random_llama(vocab_size: int, tied: bool, seed: int = 0, **shape) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.get("hidden_size", 64),
        intermediate_size=shape.get("intermediate_size", 96),
        num_hidden_layers=shape.get("layers", 2),
        num_attention_heads=shape.get("heads", 4),
        num_key_value_heads=shape.get("kv_heads", 2),
        max_position_embeddings=128,
        rope_theta=shape.get("rope_theta", 10000.0),
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(
    path: Path,
    model: torch.nn.Module,
    tok: Tokenizer,
    qtype: str = "F32",
    pre: str = "gpt2",
    arch: str = "llama",
    template: str | None = CHATML,
    extra_tokens: tuple[str, ...] = (),
    raw: dict[str, str] | None = None,
) -> Path:
    """`model` as llama.cpp writes it; `qtype` (F32, F16, Q8_0, ...) for the 2-D weights, as
    llama.cpp keeps norms in F32. `extra_tokens` go after the vocabulary (a tokenizer bigger than
    the embedding); `raw` stores the named tensors as zero bytes of another type (e.g. Q8_1)."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("test-llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    vocab = tok._hf.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])] + list(extra_tokens)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    merges = json.loads(tok.to_json())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    if template is not None:
        w.add_chat_template(template)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        parts = name.split(".")
        if name.startswith("model.layers."):
            gname = f"blk.{parts[2]}." + _NAMES[".".join(parts[3:])]
        else:
            gname = _NAMES[name]
        data = tensor.detach().float().numpy()
        if gname.endswith("attn_q.weight"):
            data = _permute(data, c.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            data = _permute(data, c.num_key_value_heads)
        if gname in (raw or {}):
            rq = getattr(gguf.GGMLQuantizationType, raw[gname])
            block, size = gguf.GGML_QUANT_SIZES[rq]
            w.add_tensor(
                gname,
                np.zeros((data.shape[0], data.shape[1] // block * size), np.uint8),
                raw_dtype=rq,
            )
        elif data.ndim == 1 or q == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, np.ascontiguousarray(data, dtype=np.float32))
        elif q == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gname, data.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(data, q), raw_dtype=q)  # shape: from the bytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
