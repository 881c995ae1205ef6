"""Distilling a quantized student: what trains, and how gradients cross the rounding.

A quantized linear (the quantize pass's ``QuantLinear``) stores integer codes, which never
train. What trains is its per-channel (or per-block) weight scale ``w_scale`` (LSQ-style
scale learning), together with the student's remaining float parameters (norms, biases,
unquantized embeddings and heads). While training, each quantized linear computes
``linear(x_hat, (codes - zero) * w_scale, bias)`` where ``x_hat`` is the input after its
quantize-dequantize round trip with a straight-through estimator (``x + (qdq(x) - x).detach()``):
the forward value is the deployed arithmetic (up to float summation order), the gradient passes
the rounding unchanged. Afterwards the scales are buffers again and the modules' forwards are
their own, so the saved checkpoint is the usual quantized one with new scales.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.kernels.dequant_linear import dequantize_weight
from squeeze.kernels.dynamic_qlinear import dynamic_quantize_u8
from squeeze.kernels.quant_dequant import reference as quant_dequant


def quantized_linears(model: nn.Module) -> list[nn.Module]:
    """Modules holding integer weight codes with a weight scale (duck-typed on the quantize pass)."""
    return [m for m in model.modules() if hasattr(m, "qweight") and hasattr(m, "w_scale") and hasattr(m, "act")]


def _ste_forward(mod: Any):  # a QuantLinear, duck-typed like quantized_linears
    def forward(x: torch.Tensor) -> torch.Tensor:
        if mod.affine is not None:
            x = mod.affine(x)
        if mod.act == "dynamic":
            q, scale, zero = dynamic_quantize_u8(x)
            x = x + ((q - zero) * scale - x).detach()
        elif mod.act in ("static", "block"):
            x = x + (quant_dequant(x, mod.a_scale, mod.a_zero, mod.a_bits) - x).detach()
        return F.linear(x, dequantize_weight(mod.qweight, mod.w_scale, mod.w_zero), mod.bias)

    return forward


@contextlib.contextmanager
def trainable_scales(model: nn.Module) -> Iterator[int]:
    """Make every quantized linear's ``w_scale`` a trainable parameter with an STE forward;
    restore buffers and forwards on exit. Yields the number of quantized linears."""
    mods: list[Any] = quantized_linears(model)  # QuantLinears, duck-typed
    for m in mods:
        scale = m._buffers.pop("w_scale")
        m.w_scale = nn.Parameter(scale.detach().clone())
        m.forward = _ste_forward(m)
    try:
        yield len(mods)
    finally:
        for m in mods:
            scale = m._parameters.pop("w_scale").detach().clone()
            m.register_buffer("w_scale", scale)
            del m.forward  # the class's own forward again
            m._wkey = None  # its cached float weight is stale
