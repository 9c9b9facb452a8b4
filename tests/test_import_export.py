"""`gptflow import` / `export` / `generate --chat` as a user runs them (a real subprocess): GGUF and
Hugging Face sources to a bundle and back to a directory transformers loads unmodified with the same
logits, tokenizer and chat template; bad input is one line, exit 2, and the output left as it
was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptcore import load_bundle
from tests.gptcore.gguf_files import CHATML, random_llama, tiny_tokenizer, write_gguf

transformers = pytest.importorskip("transformers")


def _gptflow(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def _one_line_error(out: subprocess.CompletedProcess, *needles: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, out.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tok) -> Path:
    return write_gguf(
        tmp_path_factory.mktemp("gguf") / "tiny.gguf",
        random_llama(tok.vocab_size, False),
        tok,
        "Q8_0",
    )


def test_import_gguf_then_export_round_trips_through_transformers(tmp_path, gguf_file, tok):
    out = _gptflow("import", str(gguf_file), "--out", str(tmp_path / "bundle"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "bundle")
    model, btok, meta = load_bundle(tmp_path / "bundle")
    assert (
        meta["source_format"] == "gguf" and btok.chat_template == CHATML and btok.stop_ids == (2, 0)
    )
    assert not model.config.tie_embeddings

    out = _gptflow("export", str(tmp_path / "bundle"), "--out", str(tmp_path / "hf"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name
    ).eval()
    ids = torch.randint(0, tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids)[0], ref(ids).logits, atol=1e-4, rtol=1e-4)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi <|im_end|> there"},
    ]
    for prompt in (True, False):
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert text == btok.apply_chat_template(messages, add_generation_prompt=prompt)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == btok.encode(text)
    assert hf_model.generation_config.eos_token_id == [2, 0]
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )

    # and the exported directory imports back to the same bundle contents
    out = _gptflow("import", str(tmp_path / "hf"), "--out", str(tmp_path / "again"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    again, atok, _ = load_bundle(tmp_path / "again")
    assert atok.to_json() == btok.to_json() and atok.special_tokens == btok.special_tokens
    assert atok.chat_template == btok.chat_template and atok.stop_ids == btok.stop_ids
    with torch.no_grad():
        assert torch.equal(again(ids)[0], model(ids)[0])


def test_import_bf16_halves_the_weights(tmp_path, gguf_file):
    for dtype in ("fp32", "bf16"):
        out = _gptflow(
            "import", str(gguf_file), "--out", str(tmp_path / dtype), "--dtype", dtype, cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr[-3000:]
    sizes = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("fp32", "bf16")}
    assert sizes["bf16"] < 0.6 * sizes["fp32"]
    assert json.loads((tmp_path / "bf16" / "metadata.json").read_text())["dtype"] == "bf16"


def test_bad_sources_are_one_line_exit_2_and_leave_the_output_alone(
    tmp_path, gguf_file, tok, capfd
):
    out_dir = tmp_path / "bundle"
    assert _gptflow("import", str(gguf_file), "--out", str(out_dir), cwd=tmp_path).returncode == 0
    before = _files(out_dir)
    data = gguf_file.read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF" + bytes(64))
    hf = random_llama(tok.vocab_size, True)
    write_gguf(tmp_path / "qwen.gguf", hf, tok, arch="qwen2")
    write_gguf(tmp_path / "q81.gguf", hf, tok, raw={"blk.1.ffn_up.weight": "Q8_1"})
    write_gguf(tmp_path / "vocab.gguf", hf, tok, extra_tokens=("<x>", "<y>"))
    cases = [
        ("truncated.gguf", "truncated or corrupt"),
        ("corrupt.gguf", "truncated or corrupt"),
        ("qwen.gguf", "architecture 'qwen2' is not supported; gptcore reads llama"),
        ("q81.gguf", "blk.1.ffn_up.weight is stored as Q8_1"),
        (
            "vocab.gguf",
            f"{tok.vocab_size + 2} tokens but token_embd.weight has {tok.vocab_size} rows",
        ),
        ("missing.gguf", "no such GGUF file"),
    ]
    for i, (name, problem) in enumerate(cases):
        args = ("import", str(tmp_path / name), "--out", str(out_dir))
        # The first as a user runs it; the rest through the same main() in this process (a
        # subprocess costs ~10 s of imports on this machine).
        err = _one_line_error(
            _gptflow(*args, cwd=tmp_path) if i == 0 else _main(capfd, *args),
            str(tmp_path / name),
            problem,
        )
        assert err.startswith("gptflow import: error: ")
        assert _files(out_dir) == before, name  # the old bundle is untouched
        assert (
            sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
        )  # no temp dir left
    _one_line_error(
        _main(capfd, "import", "builtin:nope", "--out", str(tmp_path / "x")),
        "builtin:nope",
        "builtin:smollm2-135m-instruct",
    )
    _one_line_error(
        _main(capfd, "import", str(gguf_file), "--out", str(tmp_path / "y"), "--dtype", "fp8"),
        "fp8",
        "fp32, bf16",
    )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _main(capfd, *args: str) -> subprocess.CompletedProcess:
    from flows.cli import main

    capfd.readouterr()
    code = main(list(args))
    out = capfd.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.mark.slow
def test_builtin_smollm2_imports_and_answers_a_chat(tmp_path, smollm2_gguf):
    """builtin:smollm2-135m-instruct from the cache the fixture seeded, then `generate --chat`."""
    env = {"GPTFLOW_CACHE": str(smollm2_gguf.parent.parent)}
    out = _gptflow(
        "import",
        "builtin:smollm2-135m-instruct",
        "--out",
        str(tmp_path / "smol"),
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "smol")
    out = _gptflow(
        "generate",
        str(tmp_path / "smol"),
        "--chat",
        "What is the capital of France?",
        "--max-new-tokens",
        "40",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        out.stdout.strip() == "The capital of France is Paris."
    )  # the answer alone: no template token
