"""Static fake quantization of activations (the activation half of a QDQ pair).

``squeeze::quant_dequant(x, scale, zero, bits)`` with a float scale and a uint8 zero point, per
tensor (0-d) or per channel of the last axis (1-d, BCT's block scales expanded)::

    q = clamp(round(x / scale) + zero, 0, 2^bits - 1)      x_hat = (q - zero) * scale

ONNX (standard ops, a lowering): ``DequantizeLinear(QuantizeLinear(x, scale, zero))`` in a uint8
container; below 8 bits a ``Clip`` to the representable float range comes first, which gives
the same codes (QuantizeLinear then never saturates; per channel Max/Min, as Clip takes
scalars). ONNX Runtime fuses a per-tensor pair with the weight's DequantizeLinear into integer
MatMul kernels; TensorRT parses Q/DQ natively (int8).
Activations wider than 8 bits need opset 21 (uint16) and are refused at export.
"""

from __future__ import annotations

import torch
from torch.onnx import symbolic_helper as sh

from squeeze.kernels.base import Kernel

ONNX_OP = "QuantizeLinear+DequantizeLinear"


def reference(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    z = zero.float()
    # an int8 zero point is the signed grid QuantizeLinear saturates to (symmetric, TensorRT's)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if zero.dtype == torch.int8 else (0, 2**bits - 1)
    q = torch.clamp(torch.round(x / scale) + z, float(lo), float(hi))
    return (q - z) * scale


@torch.library.custom_op("squeeze::quant_dequant", mutates_args=())
def quant_dequant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return reference(x, scale, zero, bits)


@quant_dequant.register_fake
def _(x, scale, zero, bits):
    return torch.empty_like(x)


@sh.parse_args("v", "v", "v", "i")
def symbolic(g, x, scale, zero, bits):
    from squeeze.compress.errors import SqueezeError

    if bits > 8:
        raise SqueezeError(f"ONNX export of {bits}-bit activations is not supported at opset < 21 (uint8 only)")
    per_channel = sh._get_tensor_rank(scale) == 1  # BCT: one scale per channel of the last axis
    axis = {"axis_i": -1} if per_channel else {}
    if bits < 8:
        zf = g.op("Cast", zero, to_i=1)
        lo = g.op("Mul", g.op("Neg", zf), scale)
        hi = g.op("Mul", g.op("Sub", g.op("Constant", value_t=torch.tensor(float(2**bits - 1))), zf), scale)
        # Clip takes scalar bounds only
        x = g.op("Min", g.op("Max", x, lo), hi) if per_channel else g.op("Clip", x, lo, hi)
    q = g.op("QuantizeLinear", x, scale, zero, **axis)
    return g.op("DequantizeLinear", q, scale, zero, **axis)


def examples(gen: torch.Generator) -> list[tuple]:
    out = []
    for shape, bits, per_channel in (
        ((2, 5, 16), 8, False),
        ((3, 7), 6, False),
        ((1, 4, 9, 9), 4, False),
        ((2, 3, 8), 8, True),
        ((4, 6), 4, True),
    ):
        x = torch.randn(shape, generator=gen) * 2
        c = (shape[-1],) if per_channel else ()  # BCT: per-channel (block-expanded) scales
        scale = torch.full(c, 4.0 / (2**bits - 1)) * (1 + torch.rand(c, generator=gen))
        zero = torch.randint(2 ** (bits - 2), 2 ** (bits - 1), c, generator=gen).to(torch.uint8)
        out.append((x, scale, zero, bits))
    return out


KERNEL = Kernel(
    name="quant_dequant",
    onnx_op=ONNX_OP,
    domain="",
    summary="static uint8 fake quantization of an activation, per tensor or per channel of the last axis (QDQ)",
    reference=reference,
    symbolic=symbolic,
    examples=examples,
    tensorrt_note="parsed natively (QuantizeLinear / DequantizeLinear)",
    tolerance=1e-6,  # measured 0 (same rounding, same order)
)
