"""Linear with integer weights and activations quantized at run time (ONNX Runtime's dynamic int8).

``squeeze::dynamic_qlinear(x, qweight, w_scale, w_zero, bias)`` reproduces, in PyTorch, the integer
arithmetic of the ONNX pattern it exports to, which is the pattern ``onnxruntime.quantization.
quantize_dynamic`` itself writes::

    xq, xs, xz = DynamicQuantizeLinear(x)                  # uint8, per tensor, range incl. 0
    y = Cast(MatMulInteger(xq, W^T, xz, w_zero)) * (xs * w_scale) + bias

ONNX Runtime fuses it into ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat`` (its int8 GEMM).
DynamicQuantizeLinear: scale = (max(x, 0) - min(x, 0)) / 255, zero point = round(-min / scale)
saturated to [0, 255], codes = saturate(round(x / scale) + zero point), rounding half to even as
``torch.round`` does. The integer sums are done in float32 here (exact up to 2^24, a relative
error below 1e-7 beyond), so ORT and the PyTorch twin agree to about 1e-6.

A lowering: standard ops only, no custom node. TensorRT has no MatMulInteger or
DynamicQuantizeLinear; a TensorRT deployment uses static activations (``--activations int8``).
"""

from __future__ import annotations

import torch
from torch.onnx import symbolic_helper as sh

from squeeze.kernels.base import Kernel

ONNX_OP = "DynamicQuantizeLinear+MatMulInteger"


def dynamic_quantize_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear: (codes, scale, zero point), all float tensors."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero input: ORT uses 1
    zero = torch.clamp(torch.round(-lo / scale), 0.0, 255.0)
    q = torch.clamp(torch.round(x / scale) + zero, 0.0, 255.0)
    return q, scale, zero


def reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x (..., in) float; qweight (out, in) int8; w_scale, w_zero (out,) (None: symmetric, 0);
    bias (out,) or None."""
    return compute(x, centered_weight(qweight, w_zero), w_scale, bias)


def centered_weight(qweight: torch.Tensor, w_zero: torch.Tensor | None) -> torch.Tensor:
    """(qweight - w_zero) as float: integer-valued, what MatMulInteger multiplies by."""
    return qweight.float() if w_zero is None else qweight.float() - w_zero.float()[:, None]


def compute(
    x: torch.Tensor, w_centered: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The arithmetic of :func:`reference` given the centered weight (modules cache it)."""
    q, scale, zero = dynamic_quantize_u8(x)
    acc = torch.nn.functional.linear(q - zero, w_centered)  # integer-valued
    y = acc * (scale * w_scale)
    return y + bias if bias is not None else y


@torch.library.custom_op("squeeze::dynamic_qlinear", mutates_args=())
def dynamic_qlinear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return reference(x, qweight, w_scale, w_zero, bias)


@dynamic_qlinear.register_fake
def _(x, qweight, w_scale, w_zero, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def symbolic(g, x, qweight, w_scale, w_zero, bias):
    xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
    wt = g.op("Transpose", qweight, perm_i=[1, 0])  # constant-folded into an int8 (in, out) initializer
    # a symmetric weight passes no zero point (as quantize_dynamic would, minus its all-zero vector)
    acc = g.op("MatMulInteger", xq, wt, xz) if sh._is_none(w_zero) else g.op("MatMulInteger", xq, wt, xz, w_zero)
    scale = g.op("Mul", xs, w_scale)
    y = g.op("Mul", g.op("Cast", acc, to_i=1), scale)  # to_i=1: FLOAT
    return y if sh._is_none(bias) else g.op("Add", y, bias)


def examples(gen: torch.Generator) -> list[tuple]:
    out = []
    for lead, d_in, d_out, bias in (((2, 5), 16, 8, True), ((3,), 32, 24, False), ((1, 7), 64, 48, True)):
        w = torch.randint(-127, 128, (d_out, d_in), generator=gen, dtype=torch.int8)
        scale = torch.rand(d_out, generator=gen) * 0.01 + 1e-3
        zero = None if bias else torch.randint(-3, 4, (d_out,), generator=gen, dtype=torch.int8)
        b = torch.randn(d_out, generator=gen) if bias else None
        out.append((torch.randn(*lead, d_in, generator=gen), w, scale, zero, b))
    return out


KERNEL = Kernel(
    name="dynamic_qlinear",
    onnx_op=ONNX_OP,
    domain="",
    summary="int8 weights x uint8 activations quantized at run time (ORT dynamic pattern, fused to DynamicQuantizeMatMul)",
    reference=reference,
    symbolic=symbolic,
    examples=examples,
    tensorrt_note="no TensorRT equivalent (MatMulInteger, DynamicQuantizeLinear): use static activations",
    tolerance=1e-4,  # measured 1.2e-7 on outputs of magnitude ~1 (float32 vs int32 accumulation)
)
