"""oneDNN-prepacked Linear weights for inference on CPU.

Why: decoding multiplies a few rows (one per sequence in the batch) by every weight matrix. On
CPU, torch's default path (F.linear → BLAS) is slow at that shape; the same product against a
weight reordered once into oneDNN's blocked layout measured 1.1-4.5x faster for matrices of
GPT-2 size (e.g. 768 x 3072 at 8 rows: 239 µs vs 821 µs; the 50257 x 768 LM head: 6.5 ms vs
29 ms), in fp32 and bf16. Small matrices lose to the fixed cost of the call, so only those with at
least ``MIN_ELEMENTS`` weights are packed.

Packed weights are used only under inference mode (never where autograd could need the weight),
outside autocast, for inputs of the weight's dtype, and only while the weight is unchanged since
packing: an optimizer step, ``load_state_dict`` or a dtype/device move invalidates them and the
layer falls back to F.linear until repacked.

:func:`linear` is the same product for the flat decoding step (decode.py), with the GELU or the
residual add that follows it fused in as a oneDNN post-op.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_ELEMENTS = 1 << 17
"""Smallest weight (in_features * out_features) worth packing; below it F.linear is faster."""
_BATCH_HINT = (
    8  # oneDNN picks a layout for this many rows; measured as good as larger hints for any count
)


def _stamp(weight: torch.Tensor) -> tuple[int, int, torch.dtype]:
    try:
        version = weight._version
    except (
        RuntimeError
    ):  # an inference tensor has no version counter; its storage still identifies it
        version = -1
    return weight.data_ptr(), version, weight.dtype


class PackedWeight:
    """A weight in oneDNN's layout and the stamp of the weight it was made from."""

    def __init__(self, weight: torch.Tensor):
        self.stamp = _stamp(weight)
        self.tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT)

    def fresh_for(self, weight: torch.Tensor) -> bool:
        return self.stamp == _stamp(weight)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) that uses a packed weight when one is fresh."""

    packed: PackedWeight | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # a packed copy is a cache: not pickled, not deep-copied
        state.pop("packed", None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = usable_packed(self, x)
        if packed is not None:
            y = _linear_pointwise(x.reshape(-1, x.size(-1)), packed, self.bias, "none", [], "")
            return y.view(*x.shape[:-1], y.size(-1))
        return F.linear(x, self.weight, self.bias)


def usable_packed(module: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    """`module`'s packed weight if it may be used for input `x` here and now, else None."""
    packed = getattr(module, "packed", None)
    if (
        packed is not None
        and torch.is_inference_mode_enabled()
        and x.dtype == module.weight.dtype
        and not torch.is_autocast_enabled(x.device.type)
        and packed.fresh_for(module.weight)
    ):
        return packed.tensor
    return None


def linear(
    module: nn.Linear, x: torch.Tensor, *, gelu: bool = False, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """module(x) for 2-D `x`, then tanh-GELU if `gelu`, then `+ residual` if given. With a usable
    packed weight the GELU, or the add when there is no GELU, runs as a oneDNN post-op of the
    product."""
    packed = usable_packed(module, x)
    if packed is not None and residual is not None and not gelu:
        return _linear_binary(x, residual, packed, module.bias, "add")
    if packed is not None:
        y = _linear_pointwise(
            x, packed, module.bias, "gelu" if gelu else "none", [], "tanh" if gelu else ""
        )
    else:
        y = F.linear(x, module.weight, module.bias)
        if gelu:
            y = F.gelu(y, approximate="tanh")
    return y if residual is None else residual + y


def supported(weight: torch.Tensor) -> bool:
    """Whether this torch build can pack this weight (CPU, oneDNN, fp32 or hardware bf16)."""
    if (
        weight.device.type != "cpu"
        or not torch.backends.mkldnn.is_available()
        or _linear_pointwise is None
    ):
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_linears(model: nn.Module) -> int:
    """Pack (or refresh) every large enough :class:`Linear` of `model`; returns how many are packed.

    Cheap when nothing changed. Call it under inference mode before decoding.
    """
    count = 0
    for module in model.modules():
        if (
            not isinstance(module, Linear)
            or module.weight.numel() < MIN_ELEMENTS
            or not supported(module.weight)
        ):
            continue
        if module.packed is None or not module.packed.fresh_for(module.weight):
            module.packed = PackedWeight(module.weight)
        count += 1
    return count


# internal ops (the ones inductor uses for frozen CPU linears): builds without them use F.linear
try:
    _linear_pointwise = torch.ops.mkldnn._linear_pointwise.default
    _linear_binary = torch.ops.mkldnn._linear_pointwise.binary
    torch.ops.mkldnn._reorder_linear_weight.default  # noqa: B018 (only checks that it exists)
except (AttributeError, RuntimeError):
    _linear_pointwise = _linear_binary = None
