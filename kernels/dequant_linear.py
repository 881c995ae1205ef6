"""Linear whose weight is stored as integers and dequantized in the graph (QDQ weight side).

``squeeze::dequant_linear(x, qweight, w_scale, w_zero, bias)`` with ``qweight`` (out, in) int8,
and ``w_scale`` / ``w_zero`` of shape (out, n_blocks): one (scale, zero point) per output channel
(n_blocks = 1) or per block of ``in / n_blocks`` input columns (BCT block-wise)::

    W = (qweight - w_zero) * w_scale          y = x @ W^T + bias

ONNX (standard ops, a lowering): ``W = (CastLike(W int8) - zero) * scale``, then a float
MatMul. This deliberately avoids DequantizeLinear: ONNX Runtime 1.32 fuses DequantizeLinear +
MatMul into ``MatMulNBits``, which quantizes the *activations* per block at run time (accuracy
level 4), so a weight-only graph would no longer be weight-only and would disagree with its
PyTorch twin by ~1% (measured). CastLike keeps the int8 initializer in the file (the TorchScript
exporter constant-folds Cast but not CastLike); ORT computes in float. Static activations use
``static_qlinear`` instead, whose DequantizeLinear weight ORT fuses into an integer kernel.
"""

from __future__ import annotations

import torch
from torch.onnx import symbolic_helper as sh

from squeeze.kernels.base import Kernel

ONNX_OP = "CastLike+Mul+MatMul"


def dequantize_weight(qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor) -> torch.Tensor:
    """(out, in) float weight from int codes and per-channel or per-block scales / zero points."""
    out_f, in_f = qweight.shape
    nb = w_scale.shape[1]
    q = qweight.float().view(out_f, nb, in_f // nb)
    return ((q - w_zero.float().unsqueeze(-1)) * w_scale.unsqueeze(-1)).view(out_f, in_f)


def reference(
    x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.nn.functional.linear(x, dequantize_weight(qweight, w_scale, w_zero), bias)


@torch.library.custom_op("squeeze::dequant_linear", mutates_args=())
def dequant_linear(
    x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return reference(x, qweight, w_scale, w_zero, bias)


@dequant_linear.register_fake
def _(x, qweight, w_scale, w_zero, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _const_shape(g, dims: list[int]):
    return g.op("Constant", value_t=torch.tensor(dims, dtype=torch.int64))


def weight_from_codes(g, qweight, w_scale, w_zero):
    """(in, out) float weight computed in the graph from int8 codes (CastLike, not folded)."""
    from squeeze.compress.errors import SqueezeError

    if qweight.type().scalarType() != "Char":
        raise SqueezeError("ONNX export of weights wider than 8 bits is not supported at opset < 21")
    out_f, in_f = sh._get_tensor_sizes(qweight)
    nb = sh._get_tensor_sizes(w_scale)[1]
    blocks = g.op("Reshape", qweight, _const_shape(g, [out_f, nb, in_f // nb]))  # folded, still int8
    axis = _const_shape(g, [2])
    q = g.op("CastLike", blocks, w_scale)
    z = g.op("Unsqueeze", g.op("CastLike", w_zero, w_scale), axis)
    w = g.op("Mul", g.op("Sub", q, z), g.op("Unsqueeze", w_scale, axis))
    return g.op("Transpose", g.op("Reshape", w, _const_shape(g, [out_f, in_f])), perm_i=[1, 0])


def symbolic(g, x, qweight, w_scale, w_zero, bias):
    y = g.op("MatMul", x, weight_from_codes(g, qweight, w_scale, w_zero))
    return y if sh._is_none(bias) else g.op("Add", y, bias)


def examples(gen: torch.Generator) -> list[tuple]:
    out = []
    for lead, d_in, d_out, nb, bias in (((2, 5), 16, 8, 1, True), ((3,), 32, 24, 4, False), ((1, 7), 64, 48, 2, True)):
        w = torch.randint(-127, 128, (d_out, d_in), generator=gen, dtype=torch.int8)
        scale = torch.rand(d_out, nb, generator=gen) * 0.01 + 1e-3
        zero = torch.randint(-3, 4, (d_out, nb), generator=gen, dtype=torch.int8)
        b = torch.randn(d_out, generator=gen) if bias else None
        out.append((torch.randn(*lead, d_in, generator=gen), w, scale, zero, b))
    return out


KERNEL = Kernel(
    name="dequant_linear",
    onnx_op=ONNX_OP,
    domain="",
    summary="integer weights (per channel or per block) dequantized in the graph, float MatMul (weight-only, BCT)",
    reference=reference,
    symbolic=symbolic,
    examples=examples,
    tensorrt_note="parsed natively (CastLike, Mul, MatMul): float compute",
    tolerance=1e-5,  # measured 1e-6 (MLAS vs PyTorch float accumulation order)
)
