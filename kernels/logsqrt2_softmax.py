"""Log-sqrt2 quantized softmax (RepQ-ViT / RepQuant post-softmax quantizer).

Attention probabilities A in (0, 1] are quantized on a log grid with base sqrt(2)::

    q = clamp(round(-2 * log2(A / s)), 0, 2^b - 1)      entries with q >= 2^b become 0
    A_hat = s * 2^(-q/2) = s * 2^(-ceil(q/2)) * (1 + (q mod 2) * (sqrt(2) - 1))

The second form is the *shift form*: even codes are a pure right shift by q/2, odd codes a shift
by (q+1)/2 scaled by sqrt(2), so A_hat @ V is two shift-accumulate paths with sqrt(2) folded into
the scale of the odd one (:func:`logsqrt2_matmul_shift`).

The operator ``squeeze::logsqrt2_softmax(x, scale, bits)`` is softmax over the last axis followed
by this quantize-dequantize. In ONNX it is one ``squeeze::LogSqrt2Softmax`` node (attribute
``bits``) whose local function body is standard ops, computed in exactly the order of
:func:`reference` (Softmax, Div, Log, Mul, Round, Max, Less, Pow, Mul, Where), so PyTorch and
onnxruntime agree to the last ulp of Pow and Log. TensorRT maps the node to the plugin
``SqueezeLogSqrt2Softmax`` version 1 (an int8 log-domain softmax; not shipped by TensorRT).
"""

from __future__ import annotations

import math

import onnx
import torch
from onnx import TensorProto, helper
from torch.onnx import symbolic_helper as sh

from squeeze.kernels.base import DOMAIN, Kernel

ONNX_OP = "LogSqrt2Softmax"
NEG_TWO_OVER_LN2 = -2.0 / math.log(2.0)  # -2 * log2(r) == ln(r) * (-2 / ln 2)
SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------------------------
# The quantizer (pure PyTorch, the source of truth)
# --------------------------------------------------------------------------------------------


def logsqrt2_codes(a: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Unclamped-above codes q = max(round(-2 log2(a / s)), 0); +inf where a == 0."""
    q = torch.round(torch.log(a / scale) * NEG_TWO_OVER_LN2)
    return torch.clamp_min(q, 0.0)


def logsqrt2_dequantize(q: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """s * 2^(-q/2), and 0 where q >= 2^bits (below the smallest level)."""
    y = torch.pow(2.0, q * -0.5) * scale
    return torch.where(q < float(2**bits), y, torch.zeros_like(y))


def logsqrt2_dequantize_shift(q: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """The shift form: s * 2^(-ceil(q/2)) * (1 + (q mod 2)(sqrt2 - 1)), 0 where q >= 2^bits."""
    keep = q < float(2**bits)
    qc = torch.where(keep, q, torch.zeros_like(q))
    odd = torch.remainder(qc, 2.0)
    y = torch.pow(2.0, -torch.ceil(qc / 2)) * (1 + odd * (SQRT2 - 1)) * scale
    return torch.where(keep, y, torch.zeros_like(y))


def logsqrt2_matmul_shift(q: torch.Tensor, v: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """A_hat @ V computed as two shift-accumulate paths (RepQ-ViT's inference form).

    ``s * [sum_{q even} V * 2^(-q/2) + sqrt2 * sum_{q odd} V * 2^(-(q+1)/2)]``. Multiplying by
    an integer power of two is exact in floating point (a shift of the exponent); with integer
    V codes a hardware shift truncates instead, which this float form deliberately does not model.

    Args:
        q: codes, (..., T, S).
        v: values, (..., S, D).
    """
    keep = q < float(2**bits)
    even = keep & (torch.remainder(q, 2.0) == 0)
    odd = keep & ~even
    qz = torch.where(keep, q, torch.zeros_like(q))
    shift_even = torch.where(even, torch.pow(2.0, -qz / 2), torch.zeros_like(q))
    shift_odd = torch.where(odd, torch.pow(2.0, -(qz + 1) / 2), torch.zeros_like(q))
    return scale * (shift_even @ v + SQRT2 * (shift_odd @ v))


def reference(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """softmax(x, -1), then log-sqrt2 quantize-dequantize with scale ``scale`` and ``bits``."""
    p = torch.softmax(x, dim=-1)
    return logsqrt2_dequantize(logsqrt2_codes(p, scale), scale, bits)


def search_scale(a: torch.Tensor, bits: int, quantiles=(0.999, 0.9999, 0.99999), max_values: int = 1 << 22) -> float:
    """The scale s among the {0.999, 0.9999, 0.99999} quantiles of A with the lowest L2 error."""
    flat = a.detach().reshape(-1).float()
    if flat.numel() > max_values:  # quantile() has a size limit; a strided sample keeps the tail
        flat = flat[:: math.ceil(flat.numel() / max_values)]
    best, best_err = 1.0, math.inf
    for qt in quantiles:
        s = float(torch.quantile(flat, qt).clamp_min(1e-8))
        err = float((logsqrt2_dequantize(logsqrt2_codes(flat, s), s, bits) - flat).pow(2).sum())
        if err < best_err:
            best, best_err = s, err
    return best


# --------------------------------------------------------------------------------------------
# torch.library op, TorchScript symbolic, ONNX function
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("squeeze::logsqrt2_softmax", mutates_args=())
def logsqrt2_softmax(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return reference(x, scale, bits)


@logsqrt2_softmax.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.empty_like(x)


@sh.parse_args("v", "v", "i")
def symbolic(g, x, scale, bits):
    return g.op(f"{DOMAIN}::{ONNX_OP}", x, scale, bits_i=bits)


def function(opset: int) -> onnx.FunctionProto:
    """``squeeze::LogSqrt2Softmax(X, S) bits=int``: the body mirrors :func:`reference`."""
    bits_ref = onnx.AttributeProto(name="value_int", ref_attr_name="bits", type=onnx.AttributeProto.INT)
    bits_node = helper.make_node("Constant", [], ["bits_i"])
    bits_node.attribute.append(bits_ref)

    def const(name: str, value: float) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value_float=value)

    nodes = [
        helper.make_node("Softmax", ["X"], ["p"], axis=-1),
        helper.make_node("Div", ["p", "S"], ["r"]),
        helper.make_node("Log", ["r"], ["l"]),
        const("c", NEG_TWO_OVER_LN2),
        helper.make_node("Mul", ["l", "c"], ["t"]),
        helper.make_node("Round", ["t"], ["qr"]),
        const("zero", 0.0),
        helper.make_node("Max", ["qr", "zero"], ["q"]),
        bits_node,
        helper.make_node("Cast", ["bits_i"], ["bits_f"], to=TensorProto.FLOAT),
        const("two", 2.0),
        helper.make_node("Pow", ["two", "bits_f"], ["levels"]),
        helper.make_node("Less", ["q", "levels"], ["keep"]),
        const("neg_half", -0.5),
        helper.make_node("Mul", ["q", "neg_half"], ["e"]),
        helper.make_node("Pow", ["two", "e"], ["pw"]),
        helper.make_node("Mul", ["pw", "S"], ["y"]),
        helper.make_node("Where", ["keep", "y", "zero"], ["Y"]),
    ]
    return helper.make_function(
        DOMAIN, ONNX_OP, ["X", "S"], ["Y"], nodes, [helper.make_opsetid("", opset)], attributes=["bits"]
    )


def examples(gen: torch.Generator) -> list[tuple]:
    out = []
    for shape, bits in (((2, 4, 7, 7), 4), ((1, 2, 5, 9), 8), ((3, 1, 16, 16), 6)):
        x = torch.randn(shape, generator=gen) * 3
        x[..., -1] = -3.4e38  # a masked position, as an additive attention mask makes it
        out.append((x, torch.tensor(1.0), bits))
    return out


KERNEL = Kernel(
    name="logsqrt2_softmax",
    onnx_op=ONNX_OP,
    domain=DOMAIN,
    summary="softmax over the last axis, then log-sqrt2 quantize-dequantize (post-softmax attention probabilities)",
    reference=reference,
    symbolic=symbolic,
    examples=examples,
    function=function,
    tensorrt_plugin="SqueezeLogSqrt2Softmax",
    tensorrt_plugin_version="1",
    tensorrt_note="int8 log-domain softmax; the plugin is not shipped with TensorRT",
    tolerance=1e-6,  # measured 6e-8 (ulps of Pow/Log between ORT and PyTorch)
)
