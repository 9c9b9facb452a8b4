"""Knowledge distillation loss, fused and chunked like the cross-entropy in fused_loss.py.

The student's loss at each kept position is
``alpha * CE(label) + (1 - alpha) * tau^2 * KL(p_t || q_s)`` where ``q_s = softmax(z_s / tau)`` and
``p_t = softmax(z_t / tau)`` are the student's and the teacher's distributions at temperature
``tau`` (Hinton et al., 2015; the ``tau^2`` keeps the soft term's gradient on the scale of the hard
term's as ``tau`` changes). Neither model's (B, T, vocab) logits exist at once: the teacher hands
over its final hidden states and LM-head weight, and the rows are processed a chunk at a time --
both models' logits for one chunk, the loss, and at once the gradient with respect to the student's
hidden states and head weight::

    d loss / d z_s = alpha * (softmax(z_s) - onehot(label)) + (1 - alpha) * tau * (q_s - p_t)

Backward then only scales the two saved gradients. A test checks loss and gradients against the
plain formula on materialised logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Rows per chunk: about 8 MiB per (rows, vocab) fp32 tensor; a chunk holds a handful of them.
_CHUNK_ELEMENTS = 1 << 21
_MIN_CHUNK_ROWS = 32


@dataclass
class Distillation:
    """What the student's forward needs from its teacher for one batch.

    ``hidden``: the teacher's final (post-LayerNorm) hidden states for the same input, (B, T,
    C_teacher), computed without gradients; ``weight``: the teacher's LM head, (vocab, C_teacher).
    ``parts`` is filled in by the forward: the mean cross-entropy and KL over the kept positions
    (detached), for logging.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    alpha: float
    temperature: float
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_distillation(self.alpha, self.temperature)


def check_distillation(alpha: float, temperature: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"alpha={alpha!r} must be in [0, 1] (the weight of the labels' cross-entropy)"
        )
    if not temperature > 0.0:
        raise ValueError(f"temperature={temperature!r} must be > 0")


def chunked_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss sum, cross-entropy sum, KL sum) over rows with target != -1; only the first is
    differentiable.

    hidden (N, C) and weight (V, C): the student's; teacher_hidden (N, C_t) and teacher_weight (V,
    C_t): the teacher's; targets (N,), -1 for ignored rows. Softmaxes in fp32; under autocast the
    matmuls run in the autocast dtype.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be (N, C) and targets (N,), got "
            f"{tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    if teacher_hidden.shape[0] != hidden.shape[0] or teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"teacher rows {tuple(teacher_hidden.shape)} and "
            f"vocabulary {tuple(teacher_weight.shape)} must match the "
            f"student's {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    check_distillation(alpha, temperature)
    return _ChunkedDistillation.apply(
        hidden, weight, targets, teacher_hidden, teacher_weight, alpha, temperature
    )


class _ChunkedDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_hidden, teacher_weight, alpha, tau):  # type: ignore[override]
        device_type = hidden.device.type
        dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else hidden.dtype
        )
        with torch.autocast(device_type, enabled=False):
            x, w = hidden.detach().to(dtype), weight.detach().to(dtype)
            xt, wt = teacher_hidden.detach().to(dtype), teacher_weight.detach().to(dtype)
            need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_x = torch.empty_like(x) if need_x else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            sums = torch.zeros(3, dtype=torch.float32, device=x.device)  # loss, CE, KL
            N, V = x.size(0), w.size(0)
            rows = max(_MIN_CHUNK_ROWS, _CHUNK_ELEMENTS // V)
            for start in range(0, N, rows):
                end = min(start + rows, N)
                keep = (targets[start:end] != -1).unsqueeze(1)  # (n, 1)
                tgt = targets[start:end].clamp(min=0).unsqueeze(1)
                z = (x[start:end] @ w.t()).float()  # (n, V) student logits
                log_p = torch.log_softmax(z, dim=1)
                log_q = torch.log_softmax(z.div_(tau), dim=1)  # the student at temperature tau
                log_pt = torch.log_softmax((xt[start:end] @ wt.t()).float().div_(tau), dim=1)
                p_t = log_pt.exp()
                ce = -log_p.gather(1, tgt)  # (n, 1)
                kl = (p_t * (log_pt - log_q)).sum(dim=1, keepdim=True)  # (n, 1)
                kept = keep.to(torch.float32)
                sums += torch.stack(
                    [
                        ((alpha * ce + (1.0 - alpha) * tau * tau * kl) * kept).sum(),
                        (ce * kept).sum(),
                        (kl * kept).sum(),
                    ]
                )
                if grad_x is None and grad_w is None:
                    continue
                # alpha * (softmax(z) - onehot) + (1 - alpha) * tau * (q - p_t),
                # zero on ignored rows
                grad = log_p.exp_().mul_(alpha)
                grad.scatter_add_(1, tgt, torch.full_like(ce, -alpha))
                grad.add_(log_q.exp_().sub_(p_t), alpha=(1.0 - alpha) * tau)
                grad = grad.mul_(kept).to(dtype)
                if grad_x is not None:
                    torch.mm(grad, w, out=grad_x[start:end])
                if grad_w is not None and dtype == torch.float32:
                    grad_w.addmm_(grad.t(), x[start:end])
                elif grad_w is not None:
                    grad_w += (grad.t() @ x[start:end]).float()
        ctx.save_for_backward(
            grad_x if grad_x is not None else torch.empty(0),
            grad_w.to(weight.dtype) if grad_w is not None else torch.empty(0),
        )
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ce_sum, kl_sum = sums[1].clone(), sums[2].clone()
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return sums[0].clone(), ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_out, _grad_ce, _grad_kl):  # type: ignore[override]
        grad_x, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        dx = (grad_x * grad_out).to(hidden_dtype) if ctx.needs_input_grad[0] else None
        dw = (grad_w * grad_out).to(weight_dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None, None, None
