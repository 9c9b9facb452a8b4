"""The fused, chunked distillation loss equals the plain formula on materialised logits, in value
and in gradients; alpha=1 is exactly the labels' cross-entropy; the teacher gets no gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gptcore.distillation as distillation
from gptcore import GPT, Distillation, GPTConfig

STUDENT = GPTConfig(vocab_size=512, context_length=32, n_layer=1, n_head=2, d_model=32)
TEACHER = GPTConfig(vocab_size=512, context_length=64, n_layer=2, n_head=4, d_model=64)
# The Llama family on both sides: a tied student, an untied GQA teacher.
_LLAMA = dict(bias=False, norm="rmsnorm", positions="rotary", mlp="swiglu")
PAIRS = {
    "gpt2": (STUDENT, TEACHER),
    "llama": (
        GPTConfig(vocab_size=512, context_length=32, n_layer=1, n_head=2, d_model=32, **_LLAMA),
        GPTConfig(
            vocab_size=512,
            context_length=64,
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            d_model=64,
            tie_embeddings=False,
            **_LLAMA,
        ),
    ),
}


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, STUDENT.vocab_size, (3, 20), generator=g)
    targets = torch.randint(0, STUDENT.vocab_size, (3, 20), generator=g)
    targets[0, :5] = -1
    mask = torch.rand(3, 20, generator=g) > 0.3
    return idx, targets, mask


def _models(family: str = "gpt2"):
    torch.manual_seed(0)
    student, teacher = GPT(PAIRS[family][0]), GPT(PAIRS[family][1]).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def _plain(student: GPT, teacher: GPT, idx, targets, mask, alpha: float, tau: float):
    """The textbook loss alpha * CE + (1 - alpha) * tau^2 * KL(p_t || q_s), mean over kept
    positions; with its CE and KL."""
    logits, _ = student(idx)
    with torch.no_grad():
        t_logits, _ = teacher(idx)
    kept = (targets != -1) & mask
    s, t, y = logits[kept], t_logits[kept], targets[kept]
    ce = F.cross_entropy(s, y)
    kl = F.kl_div(
        F.log_softmax(s / tau, -1),
        F.log_softmax(t / tau, -1),
        log_target=True,
        reduction="batchmean",
    )
    return alpha * ce + (1 - alpha) * tau * tau * kl, float(ce.detach()), float(kl.detach())


def _grads(model: GPT) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(
    ("alpha", "tau", "chunk_elements"),
    [
        (0.5, 2.0, 1 << 21),  # one chunk
        (0.2, 1.0, 512 * 7),  # several chunks, the last one short
        (0.0, 4.0, 512 * 7),  # soft targets only
    ],
)
@pytest.mark.parametrize("family", list(PAIRS))
def test_fused_distillation_matches_the_plain_formula(
    monkeypatch, alpha, tau, chunk_elements, family
):
    monkeypatch.setattr(distillation, "_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(distillation, "_MIN_CHUNK_ROWS", 1)
    student, teacher = _models(family)
    idx, targets, mask = _batch()
    plain, ce, kl = _plain(student, teacher, idx, targets, mask, alpha, tau)
    plain.backward()
    expected = _grads(student)
    kd = Distillation(teacher.features(idx), teacher.lm_head.weight, alpha, tau)
    logits, fused = student(idx, targets, mask, distill=kd)
    fused.backward()
    got = _grads(student)
    assert logits is None
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-6), (float(fused), float(plain))
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-7), name
    assert all(p.grad is None for p in teacher.parameters())
    kept = int(((targets != -1) & mask).sum())
    # the logged parts: the CE and KL sums over the kept positions
    assert float(kd.parts["ce_sum"]) / kept == pytest.approx(ce, rel=1e-5)
    assert float(kd.parts["kl_sum"]) / kept == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert not kd.parts["ce_sum"].requires_grad


def test_alpha_one_is_the_labels_cross_entropy_exactly():
    student, teacher = _models()
    idx, targets, mask = _batch(1)
    _, ce = student(idx, targets, mask, return_logits=False)
    ce.backward()
    expected = _grads(student)
    _, kd = student(
        idx,
        targets,
        mask,
        distill=Distillation(teacher.features(idx), teacher.lm_head.weight, 1.0, 3.0),
    )
    kd.backward()
    got = _grads(student)
    assert torch.allclose(kd, ce, rtol=1e-6, atol=1e-7)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-5, atol=1e-8), name


def test_a_student_that_equals_its_teacher_has_zero_kl():
    torch.manual_seed(0)
    student = GPT(STUDENT)
    idx, targets, _ = _batch(2)
    kd = Distillation(student.features(idx).detach(), student.lm_head.weight.detach(), 0.0, 2.0)
    _, loss = student(idx, targets, distill=kd)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("alpha", "tau"), [(-0.1, 1.0), (1.5, 1.0), (0.5, 0.0), (0.5, -2.0)])
def test_bad_alpha_or_temperature_is_refused(alpha, tau):
    with pytest.raises(ValueError, match="alpha" if not 0 <= alpha <= 1 else "temperature"):
        Distillation(torch.zeros(1, 1, 4), torch.zeros(8, 4), alpha, tau)
