"""LoRA fine-tuning through the real stage (Ray Train + DeepSpeed): the bundle is a plain model of
the base's size whose weights moved by a low-rank update on the targeted layers only, a worker that
dies mid-run resumes to bit-identical weights, and the configs LoRA cannot serve are refused up
front."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flows.config import ConfigError, load_config
from gptcore import GPT, Tokenizer, load_bundle, preset, save_bundle
from tests.steps import train
from tests.train.train_fixtures import injected_faults, make_dataset

pytestmark = pytest.mark.slow

R = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", vocab_size=512, max_chars=200_000)


@pytest.fixture(scope="module")
def base(dataset, tmp_path_factory) -> Path:
    """A random tiny GPT with the dataset's tokenizer: the model the adapters adapt."""
    tok = Tokenizer.load(dataset / "tokenizer.json")
    torch.manual_seed(0)
    return save_bundle(
        tmp_path_factory.mktemp("base") / "b", GPT(preset("tiny", vocab_size=tok.vocab_size)), tok
    )


def _cfg(workdir: Path, dataset: Path, base: Path, *overrides: str):
    return load_config(
        None,
        [
            f"workdir={workdir}",
            "tracking.enabled=false",
            "model.preset=tiny",
            f"finetune.data={dataset}",
            f"finetune.init={base}",
            "finetune.steps=8",
            "finetune.lr=1e-2",
            "finetune.warmup_steps=0",
            "finetune.micro_batch_size=4",
            "finetune.eval_every=4",
            "finetune.checkpoint_every=2",
            f"finetune.lora.r={R}",
            "finetune.lora.alpha=4",
            "finetune.lora.targets=[attn.c_attn, mlp.c_fc]",
            *overrides,
        ],
    )


ZERO2 = ("finetune.num_workers=2", "finetune.zero_stage=2", "finetune.precision=fp32")


@pytest.fixture(scope="module")
def uninterrupted(ray_local, dataset, base, tmp_path_factory) -> Path:
    return train(_cfg(tmp_path_factory.mktemp("w"), dataset, base, *ZERO2), "finetune")


def test_the_bundle_is_the_base_plus_a_merged_low_rank_update_on_the_targets(uninterrupted, base):
    tuned, _, meta = load_bundle(uninterrupted)
    start, _, _ = load_bundle(base)
    assert tuned.num_params() == start.num_params() and meta["lora"]["r"] == R
    a, b = tuned.state_dict(), start.state_dict()
    assert a.keys() == b.keys()  # no adapter left: a plain model
    for name in a:
        if name.endswith(("attn.c_attn.weight", "mlp.c_fc.weight")):
            delta = (a[name] - b[name]).double()
            assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta, atol=1e-6) <= R, name
        else:
            # every other weight was frozen, and comes back exactly as the base's (not re-rounded)
            assert torch.equal(a[name], b[name]), name


def test_a_worker_that_dies_mid_run_resumes_to_identical_weights(
    uninterrupted, dataset, base, tmp_path
):
    with injected_faults(fail_at_step=5):
        bundle = train(_cfg(tmp_path, dataset, base, *ZERO2), "finetune")
    meta = load_bundle(bundle)[2]
    # Rank 1 exited at step 5; the group restarted from the newest checkpoint Ray had registered by
    # then.
    assert 0 < meta["resumed_from_step"] < 5, meta
    x, y = load_bundle(uninterrupted)[0].state_dict(), load_bundle(bundle)[0].state_dict()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, msg=k)


def test_bf16_weights_without_zero_merge_into_the_bases_fp32_weights(
    ray_local, dataset, base, tmp_path
):
    bundle = train(
        _cfg(
            tmp_path,
            dataset,
            base,
            "finetune.num_workers=1",
            "finetune.zero_stage=0",
            "finetune.precision=bf16",
            "finetune.steps=4",
        ),
        "finetune",
    )
    a, b = load_bundle(bundle)[0].state_dict(), load_bundle(base)[0].state_dict()
    assert torch.equal(a["wte.weight"], b["wte.weight"]) and a["wte.weight"].dtype == torch.float32
    assert not torch.equal(a["blocks.0.attn.c_attn.weight"], b["blocks.0.attn.c_attn.weight"])


def test_configs_lora_cannot_serve_are_refused_before_any_worker_starts(dataset, base, tmp_path):
    from tests.steps import prepare

    with pytest.raises(
        ConfigError, match=r"finetune.zero_stage=3 is invalid: must be 0, 1 or 2 with lora"
    ):
        _cfg(tmp_path, dataset, base, "finetune.zero_stage=3")
    with pytest.raises(ConfigError, match=r"pretrain.lora.r=2: LoRA adapts a pretrained model"):
        prepare(
            load_config(
                None,
                [
                    f"workdir={tmp_path}",
                    "tracking.enabled=false",
                    f"pretrain.data={dataset}",
                    "pretrain.lora.r=2",
                    "model.preset=tiny",
                ],
            )
        )
