"""The capacity planner: held to DeepSpeed's own model-state estimators, to gptcore's parameter and
FLOP counts, to what training on this machine measures, and used before a run starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage3 import model_to_params as ds_model_to_params
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from flows.config import ConfigError, load_config
from flows.train.capacity import (
    GIB,
    Hardware,
    estimate,
    largest_layer_params,
    model_states,
    table,
    training_days,
)
from gptcore import GPT, preset
from tests.steps import prepare, train
from tests.train.train_fixtures import make_dataset

CLUSTERS = [(1, 1), (8, 1), (8, 2), (4, 4)]


@pytest.fixture(scope="module", params=["tiny", "small", "gpt2-124m"])
def counted(request):
    cfg = preset(request.param)
    total, largest = ds_model_to_params(GPT(cfg))
    return cfg, total, largest


def test_parameter_counts_are_gptcores_and_deepspeeds(counted):
    cfg, total, largest = counted
    assert cfg.num_params() == total == sum(p.numel() for p in GPT(cfg).parameters())
    assert largest_layer_params(cfg) == largest


@pytest.mark.parametrize(("gpus", "nodes"), CLUSTERS)
def test_model_states_match_deepspeeds_estimators(counted, gpus, nodes):
    cfg, total, largest = counted
    world = gpus * nodes

    def ours(zero: int, offload: bool) -> float:
        return sum(model_states(total, largest, zero, world, "bf16", offload, nodes)[:3])

    _, ds2 = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False)
    _, ds2_offload = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=True)
    _, ds3, _ = estimate_zero3_model_states_mem_needs(
        total, largest, gpus, nodes, cpu_offload=False
    )
    _, ds3_offload, _ = estimate_zero3_model_states_mem_needs(
        total, largest, gpus, nodes, cpu_offload=True, cpu_offload_params=False
    )
    for got, want in (
        (ours(2, False), ds2),
        (ours(2, True), ds2_offload),
        (ours(3, False), ds3),
        (ours(3, True), ds3_offload),
    ):
        assert abs(got - want) <= 1, (got, want)


def test_more_sharding_and_checkpointing_never_need_more_memory():
    hw = Hardware(gpus_per_node=8, nodes=2)
    cfg = preset("gpt2-1.5b")
    for precision in ("bf16", "fp32"):
        rows = [estimate(cfg, 4, precision, z, hw) for z in range(4)]
        totals = [r.total for r in rows]
        assert totals == sorted(totals, reverse=True)
        # ZeRO-3 shards the model states 16 ways; the parameters it gathers back (the whole model,
        # up to max_live_parameters) and the activations do not shrink with the world size.
        assert (
            rows[0].model_states > 8 * rows[3].model_states and rows[3].gathered > rows[3].weights
        )
    plain, ckpt = (
        estimate(cfg, 4, "bf16", 2, hw),
        estimate(cfg, 4, "bf16", 2, hw, checkpointing=True),
    )
    assert ckpt.activations < plain.activations / 5 and ckpt.model_states == plain.model_states
    offloaded = estimate(cfg, 4, "bf16", 2, hw, offload_optimizer=True)
    assert offloaded.optimizer == 0 and offloaded.cpu_offload_per_node > 0
    assert len(table(cfg, 4, "bf16", hw)) == 14


def test_time_uses_gptcores_flop_count():
    cfg, hw = preset("gpt2-124m"), Hardware(gpus_per_node=8, nodes=1, peak_tflops=100.0, mfu=0.5)
    seconds = cfg.flops_per_token() * 1e9 / (8 * 100e12 * 0.5)
    assert training_days(cfg, 1e9, hw) * 86400 == pytest.approx(seconds)


def _gptflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "gptflow"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_capacity_command_worked_example():
    out = _gptflow(
        "capacity",
        "--preset",
        "gpt2-1.5b",
        "--gpus-per-node",
        "8",
        "--gpu-mem-gib",
        "80",
        "--precision",
        "bf16",
        "--micro-batch",
        "4",
        "--tokens",
        "30e9",
    )
    assert out.returncode == 0, out.stderr
    assert "1,557.6M parameters" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 14 and all(line.rstrip().endswith(("yes", "NO")) for line in rows)
    assert "time for 3e+10 tokens" in out.stdout
    tight = _gptflow(
        "capacity",
        "--preset",
        "gpt2-1.5b",
        "--gpus-per-node",
        "1",
        "--gpu-mem-gib",
        "16",
        "--precision",
        "bf16",
        "--micro-batch",
        "8",
    )
    assert tight.returncode == 0 and tight.stdout.count("| NO") > 5
    bad = _gptflow("capacity", "--nodes", "0")
    assert bad.returncode == 2 and "--nodes=0" in bad.stderr


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("cap") / "ds", vocab_size=512, max_chars=200_000)


def _cfg(workdir: Path, data: Path, *overrides: str):
    return load_config(
        None,
        [
            f"workdir={workdir}",
            f"pretrain.data={data}",
            "tracking.enabled=false",
            "pretrain.precision=fp32",
            "pretrain.warmup_steps=1",
            *overrides,
        ],
    )


def test_a_run_that_cannot_fit_fails_before_any_worker_starts_with_the_planners_figures(
    dataset, tmp_path
):
    cfg = _cfg(
        tmp_path,
        dataset,
        "model.preset=gpt2-1.5b",
        "model.context_length=64",
        "pretrain.num_workers=2",
    )
    with pytest.raises(
        ConfigError, match=r"capacity planner estimates [\d.]+ GiB per worker \(weights"
    ):
        prepare(cfg)
    assert (
        prepare(_cfg(tmp_path, dataset, "model.preset=tiny", "model.context_length=64")).gpt_config[
            "n_layer"
        ]
        == 4
    )


# What 2 CPU workers really hold, against the planner. gpt2-124m at vocab 512 and context 64 is 85M
# parameters: the model states (16 bytes each in fp32) dominate, and the interpreter, torch,
# DeepSpeed and Ray (loaded before the model is built) are left out of the measured growth (peak
# RSS, taken before the last checkpoint and the export). Measured here: ZeRO-0 1.82-1.83 GiB per
# worker against the planner's 1.66 (+10%); ZeRO-3 2.49-2.59 in four runs against 2.15 (+16-21%),
# whose peak is the gradient bucket's reduce-scatter in the backward pass (the bucket, its
# interleaved copy, gloo's copy, the gathered model's freed pages, the sharded model states). What
# the planner leaves out, and why both stages measure above it: heap pages glibc keeps after frees
# (malloc_trim gives back 0.47 GiB after a ZeRO-3 backward).
TOLERANCE = 0.25


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_memory_model_matches_what_two_cpu_workers_measure(
    ray_local, dataset, tmp_path, zero_stage
):
    cfg = _cfg(
        tmp_path,
        dataset,
        "model.preset=gpt2-124m",
        "model.context_length=64",
        "pretrain.num_workers=2",
        f"pretrain.zero_stage={zero_stage}",
        "pretrain.steps=2",
        "pretrain.micro_batch_size=2",
        "pretrain.eval_every=2",
        "pretrain.checkpoint_every=2",
        "pretrain.eval_batches=1",
    )
    p = prepare(cfg)
    from gptcore import GPTConfig

    gpt = GPTConfig.from_dict(p.gpt_config)
    predicted = estimate(
        gpt, 2, "fp32", zero_stage, Hardware(gpus_per_node=2, nodes=1), gpu=False
    ).total
    bundle = train(cfg)
    measured = json.loads((bundle / "train_result.json").read_text())["metrics"][
        "rss_growth_bytes_max_rank"
    ]
    assert abs(measured - predicted) <= TOLERANCE * predicted, (measured / GIB, predicted / GIB)
