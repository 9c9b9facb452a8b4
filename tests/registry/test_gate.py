"""The promotion gate alone: a pure function of two evaluations and a margin."""

from __future__ import annotations

import math

import pytest

from flows.registry.gate import Figures, decide


def test_first_model_becomes_champion():
    d = decide(Figures(2.0, 30.0), None)
    assert d.promote and "first model" in d.reason and d.tags()["gptflow.gate"] == "passed"


def test_better_by_the_margin_passes_and_within_it_is_refused():
    champion = Figures(bits_per_byte=2.0, perplexity=30.0)
    assert decide(Figures(1.97, 29.0), champion, margin=0.01).promote  # 1.5% better
    refused = decide(Figures(1.99, 29.9), champion, margin=0.01)  # 0.5% better: not enough
    assert not refused.promote and refused.tags()["gptflow.gate"] == "refused"
    assert (
        refused.tags()["gptflow.gate.champion"] == "2"
        and refused.tags()["gptflow.gate.challenger"] == "1.99"
    )
    assert not decide(Figures(2.5, 40.0), champion).promote  # worse
    assert decide(
        Figures(2.5, 25.0), champion, metric="perplexity"
    ).promote  # the metric chosen decides


def test_smoke_failures_and_non_finite_figures_are_refused():
    assert not decide(Figures(1.0, 2.0, smoke_passed=False), None).promote
    assert not decide(Figures(math.nan, math.nan), None).promote
    with pytest.raises(ValueError, match="margin"):
        decide(Figures(1.0, 2.0), None, margin=1.5)


def test_a_finite_challenger_replaces_a_champion_whose_figure_is_not_finite():
    """A NaN champion figure used to refuse every challenger forever."""
    for bad in (math.nan, math.inf):
        d = decide(Figures(2.0, 30.0), Figures(bad, bad))
        assert d.promote and "champion's bits_per_byte is not finite" in d.reason, d.reason
    assert not decide(Figures(math.nan, math.nan), Figures(math.nan, math.nan)).promote


def test_a_challenger_with_no_prompts_is_said_not_checked_not_passed():
    d = decide(Figures(1.9, 29.0, smoke_checked=False), Figures(2.0, 30.0))
    assert d.promote and d.reason.endswith("smoke checks: not checked (no prompts)"), d.reason
    assert "not checked" in decide(Figures(1.9, 29.0, smoke_checked=False), None).reason


def test_the_gate_can_compare_the_held_out_fine_tuning_loss():
    """A tuned model that lost a little general text but answers its task better passes on
    sft_val_loss."""
    champion = Figures(bits_per_byte=1.0, perplexity=10.0, sft_val_loss=2.0)
    tuned = Figures(bits_per_byte=1.1, perplexity=11.0, sft_val_loss=1.5)
    assert not decide(tuned, champion).promote  # on bits per byte it is worse
    d = decide(tuned, champion, metric="sft_val_loss")
    assert d.promote and d.reason.startswith("sft_val_loss 1.5000 <=")
    assert not decide(
        Figures(1.0, 10.0), None, metric="sft_val_loss"
    ).promote  # no SFT figure: NaN, refused
