"""Linear with integer weights and a statically calibrated, per-tensor quantized input (QDQ).

``squeeze::static_qlinear(x, a_scale, a_zero, a_bits, qweight, w_scale, w_zero, bias)``::

    x_hat = (clamp(round(x / a_scale) + a_zero, 0, 2^a_bits - 1) - a_zero) * a_scale
    y = x_hat @ ((qweight - w_zero) * w_scale)^T + bias

ONNX (standard ops, a lowering), the QDQ form TensorRT and ONNX Runtime both consume::

    [Clip] -> QuantizeLinear(uint8) -> DequantizeLinear -> MatMul(., DequantizeLinear(W^T int8, axis=1)) -> Add

ONNX Runtime fuses it into ``QuantizeLinear`` + ``MatMulIntegerToFloat`` (exact int32
accumulation, measured). Below 8 bits a Clip to the representable range comes first (same codes).
Block-wise weights (BCT) cannot be one DequantizeLinear at opset 18: the weight is then
dequantized with CastLike / Mul and ORT runs a float MatMul on the quantized input.
"""

from __future__ import annotations

import torch
from torch.onnx import symbolic_helper as sh

from squeeze.kernels import dequant_linear, quant_dequant
from squeeze.kernels.base import Kernel

ONNX_OP = "QuantizeLinear+DequantizeLinear+MatMul"


def reference(
    x: torch.Tensor,
    a_scale: torch.Tensor,
    a_zero: torch.Tensor,
    a_bits: int,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``w_zero`` None: a symmetric weight (zero point 0), exported without a zero-point input."""
    w_zero = torch.zeros(w_scale.shape, dtype=qweight.dtype) if w_zero is None else w_zero
    return dequant_linear.reference(quant_dequant.reference(x, a_scale, a_zero, a_bits), qweight, w_scale, w_zero, bias)


@torch.library.custom_op("squeeze::static_qlinear", mutates_args=())
def static_qlinear(
    x: torch.Tensor,
    a_scale: torch.Tensor,
    a_zero: torch.Tensor,
    a_bits: int,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return reference(x, a_scale, a_zero, a_bits, qweight, w_scale, w_zero, bias)


@static_qlinear.register_fake
def _(x, a_scale, a_zero, a_bits, qweight, w_scale, w_zero, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def symbolic(g, x, a_scale, a_zero, a_bits, qweight, w_scale, w_zero, bias):
    xq = quant_dequant.symbolic(g, x, a_scale, a_zero, a_bits)
    out_f = sh._get_tensor_sizes(qweight)[0]
    nb = sh._get_tensor_sizes(w_scale)[1]
    if nb == 1 and qweight.type().scalarType() == "Char":
        flat = g.op("Constant", value_t=torch.tensor([out_f], dtype=torch.int64))
        wt = g.op("Transpose", qweight, perm_i=[1, 0])  # folded: an int8 (in, out) initializer
        scale = g.op("Reshape", w_scale, flat)
        if sh._is_none(w_zero):
            w = g.op("DequantizeLinear", wt, scale, axis_i=1)
        else:
            w = g.op("DequantizeLinear", wt, scale, g.op("Reshape", w_zero, flat), axis_i=1)
    else:
        if sh._is_none(w_zero):
            w_zero = g.op("Constant", value_t=torch.zeros(sh._get_tensor_sizes(w_scale), dtype=torch.int8))
        w = dequant_linear.weight_from_codes(g, qweight, w_scale, w_zero)
    y = g.op("MatMul", xq, w)
    return y if sh._is_none(bias) else g.op("Add", y, bias)


def examples(gen: torch.Generator) -> list[tuple]:
    out = []
    for lead, d_in, d_out, nb, bits, bias in (
        ((2, 5), 16, 8, 1, 8, True),
        ((3,), 32, 24, 4, 6, False),
        ((1, 7), 64, 48, 1, 4, True),
    ):
        x = torch.randn(*lead, d_in, generator=gen)
        a_scale = torch.tensor(6.0 / (2**bits - 1))
        a_zero = torch.tensor(2 ** (bits - 1), dtype=torch.uint8)
        w = torch.randint(-127, 128, (d_out, d_in), generator=gen, dtype=torch.int8)
        scale = torch.rand(d_out, nb, generator=gen) * 0.01 + 1e-3
        zero = None if bits == 8 else torch.randint(-2, 3, (d_out, nb), generator=gen, dtype=torch.int8)
        b = torch.randn(d_out, generator=gen) if bias else None
        out.append((x, a_scale, a_zero, bits, w, scale, zero, b))
    return out


KERNEL = Kernel(
    name="static_qlinear",
    onnx_op=ONNX_OP,
    domain="",
    summary="statically quantized uint8 input x int8 weights (QDQ; ORT fuses to MatMulIntegerToFloat)",
    reference=reference,
    symbolic=symbolic,
    examples=examples,
    tensorrt_note="parsed natively (QuantizeLinear / DequantizeLinear / MatMul): TensorRT's int8 path",
    tolerance=1e-4,  # measured ~1e-6 (int32 vs float accumulation)
)
