"""LM head and cross-entropy fused and chunked: the training loss without the (B, T, vocab) logits.

The plain path materialises fp32 logits for every position (8 x 1024 x 50257 x 4 bytes = 1.6 GB
for GPT-2 at batch 8), then reads and writes them again in log-softmax, its backward and the
zero-filled gradient. Here the rows are processed a chunk at a time: logits of one chunk, their
log-sum-exp and loss, and at once the gradient of the summed loss with respect to the hidden
states and the head weight (softmax minus one-hot, times the weight or the inputs). Everything a
chunk touches stays in cache; backward only scales the two saved gradients. The same matmuls run
as in the plain path, so the results agree to rounding (a test checks loss and gradients).
"""

from __future__ import annotations

import torch

# Rows per chunk: a chunk's fp32 logits are about 16 MiB for any vocabulary. Smaller chunks
# measured slower on CPU: the (vocab, C) weight gradient is read and written once per chunk.
_CHUNK_ELEMENTS = 1 << 22
_MIN_CHUNK_ROWS = 64


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Sum over rows with target != -1 of the cross-entropy of ``hidden @ weight.T`` (fp32 softmax).

    hidden (N, C), weight (V, C), targets (N,) with -1 for ignored rows. Differentiable in hidden
    and weight. Under autocast the matmuls run in the autocast dtype, as the plain path's would.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be (N, C) and targets (N,), got "
            f"{tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    return _ChunkedCrossEntropy.apply(hidden, weight, targets)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:  # type: ignore[override]
        device_type = hidden.device.type
        dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else hidden.dtype
        )
        with torch.autocast(device_type, enabled=False):
            x = hidden.detach().to(dtype)
            w = weight.detach().to(dtype)
            need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_x = torch.empty_like(x) if need_x else None
            # fp32 accumulation across chunks, whatever the compute dtype
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=x.device)
            N, V = x.size(0), w.size(0)
            rows = max(_MIN_CHUNK_ROWS, _CHUNK_ELEMENTS // V)
            for start in range(0, N, rows):
                end = min(start + rows, N)
                xc, tc = x[start:end], targets[start:end]
                keep = tc != -1
                tgt = tc.clamp(min=0).unsqueeze(1)  # (n, 1)
                logits = (xc @ w.t()).float()  # (n, V)
                picked = logits.gather(1, tgt)  # (n, 1) the target's logit, before the in-place ops
                # One exp pass, in place: exp(logits - max) serves the log-sum-exp and the softmax.
                peak = logits.amax(dim=1, keepdim=True)  # (n, 1)
                exps = logits.sub_(peak).exp_()
                sums = exps.sum(dim=1, keepdim=True)  # (n, 1)
                total += ((sums.log() + peak - picked).squeeze(1) * keep).sum()
                if grad_x is None and grad_w is None:
                    continue
                # d(sum loss)/d logits = softmax - one_hot(target), zero on ignored rows
                grad = exps.mul_(keep.unsqueeze(1) / sums)
                grad.scatter_add_(1, tgt, -keep.unsqueeze(1).to(grad.dtype))
                grad = grad.to(dtype)
                if grad_x is not None:
                    torch.mm(grad, w, out=grad_x[start:end])
                if grad_w is not None and dtype == torch.float32:
                    grad_w.addmm_(grad.t(), xc)
                elif grad_w is not None:
                    grad_w += (grad.t() @ xc).float()
        ctx.save_for_backward(
            grad_x if grad_x is not None else torch.empty(0),
            grad_w.to(weight.dtype) if grad_w is not None else torch.empty(0),
        )
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_x, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        dx = (grad_x * grad_out).to(hidden_dtype) if ctx.needs_input_grad[0] else None
        dw = (grad_w * grad_out).to(weight_dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None
