"""Dense x sparse linear (DSFormer): y = D (S x) + b, S stored compactly.

``squeeze::dense_sparse_linear(x, dense, values, indices, bias)`` with ``dense`` D (out, k),
``values`` and ``indices`` (s, in): column j of S (k, in) holds ``values[t, j]`` at row
``indices[t, j]`` (uint8 or int16; exactly s entries per column)::

    S = scatter_add(zeros(k, in), rows=indices, values)      y = (x @ S^T) @ D^T + b

ONNX: one ``squeeze::DenseSparseLinear(X, D, V, I)`` node (the bias is a standard Add after it)
whose local function rebuilds S with ScatterElements(reduction="add") and runs two MatMuls.
The node keeps the compact initializers (values + small-integer indices) in the file, so the
``.onnx`` really is smaller; onnxruntime inlines the function and constant-folds the scatter at
session start, so at run time it computes two dense MatMuls of a rank-k product (there is no
sparse kernel on ORT CPU: the compute is that of a rank-k layer, not of s non-zeros).
TensorRT maps the node to the plugin ``SqueezeDenseSparseLinear`` version 1 (not shipped with
TensorRT; a TensorRT deployment without it would densify S offline into two MatMuls).

int8 variant (factorize, then quantize D and the S values):
``squeeze::dense_sparse_linear_int8(x, dense_q, dense_scale, values_q, values_scale, indices, bias)``
with ``dense_q`` (out, k) int8 and ``dense_scale`` (out, 1) (one symmetric scale per output
channel), ``values_q`` (s, in) int8 and ``values_scale`` (1, in) (one per column of S)::

    D = dense_q * dense_scale      V = values_q * values_scale      then as above

ONNX: one ``squeeze::DenseSparseLinearInt8(X, Dq, Ds, Vq, Vs, I)`` node whose function body
dequantizes with CastLike + Mul (not DequantizeLinear, which ORT would fuse with the MatMul into
an activation-quantizing kernel, see ``dequant_linear.py``) and then runs the body above, so the
file keeps the int8 codes; plugin ``SqueezeDenseSparseLinearInt8`` version 1.
"""

from __future__ import annotations

import onnx
import torch
from onnx import TensorProto, helper
from torch.onnx import symbolic_helper as sh

from squeeze.kernels.base import DOMAIN, Kernel

ONNX_OP = "DenseSparseLinear"
ONNX_OP_INT8 = "DenseSparseLinearInt8"


def sparse_to_dense(values: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """S (k, in) from its compact form."""
    return values.new_zeros(k, values.shape[1]).scatter_add(0, indices.long(), values)


def reference(
    x: torch.Tensor, dense: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    s = sparse_to_dense(values, indices, dense.shape[1])  # (k, in)
    return torch.nn.functional.linear(torch.nn.functional.linear(x, s), dense, bias)  # (..., out)


@torch.library.custom_op("squeeze::dense_sparse_linear", mutates_args=())
def dense_sparse_linear(
    x: torch.Tensor, dense: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return reference(x, dense, values, indices, bias)


@dense_sparse_linear.register_fake
def _(x, dense, values, indices, bias):
    return x.new_empty((*x.shape[:-1], dense.shape[0]))


def symbolic(g, x, dense, values, indices, bias):
    y = g.op(f"{DOMAIN}::{ONNX_OP}", x, dense, values, indices)
    return y if sh._is_none(bias) else g.op("Add", y, bias)


def _body() -> list[onnx.NodeProto]:
    """Nodes computing Y from X, D, V, I: densify S by ScatterElements, two MatMuls."""
    return [
        helper.make_node("Shape", ["D"], ["k"], start=1, end=2),
        helper.make_node("Shape", ["V"], ["n_in"], start=1, end=2),
        helper.make_node("Concat", ["k", "n_in"], ["s_shape"], axis=0),
        helper.make_node(
            "ConstantOfShape", ["s_shape"], ["zeros"], value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
        ),
        helper.make_node("CastLike", ["zeros", "V"], ["zeros_t"]),
        helper.make_node("Cast", ["I"], ["rows"], to=TensorProto.INT64),
        helper.make_node("ScatterElements", ["zeros_t", "rows", "V"], ["S"], axis=0, reduction="add"),
        helper.make_node("Transpose", ["S"], ["S_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["X", "S_t"], ["code"]),
        helper.make_node("Transpose", ["D"], ["D_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["code", "D_t"], ["Y"]),
    ]


def function(opset: int) -> onnx.FunctionProto:
    """``squeeze::DenseSparseLinear(X, D, V, I)``: densify S by ScatterElements, two MatMuls."""
    return helper.make_function(DOMAIN, ONNX_OP, ["X", "D", "V", "I"], ["Y"], _body(), [helper.make_opsetid("", opset)])


# --------------------------------------------------------------------------------------------
# int8 D and S values
# --------------------------------------------------------------------------------------------


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float tensor from symmetric integer codes and a broadcastable scale."""
    return codes.to(scale.dtype) * scale


def reference_int8(
    x: torch.Tensor,
    dense_q: torch.Tensor,
    dense_scale: torch.Tensor,
    values_q: torch.Tensor,
    values_scale: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return reference(x, dequantize(dense_q, dense_scale), dequantize(values_q, values_scale), indices, bias)


@torch.library.custom_op("squeeze::dense_sparse_linear_int8", mutates_args=())
def dense_sparse_linear_int8(
    x: torch.Tensor,
    dense_q: torch.Tensor,
    dense_scale: torch.Tensor,
    values_q: torch.Tensor,
    values_scale: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return reference_int8(x, dense_q, dense_scale, values_q, values_scale, indices, bias)


@dense_sparse_linear_int8.register_fake
def _(x, dense_q, dense_scale, values_q, values_scale, indices, bias):
    return x.new_empty((*x.shape[:-1], dense_q.shape[0]))


def symbolic_int8(g, x, dense_q, dense_scale, values_q, values_scale, indices, bias):
    y = g.op(f"{DOMAIN}::{ONNX_OP_INT8}", x, dense_q, dense_scale, values_q, values_scale, indices)
    return y if sh._is_none(bias) else g.op("Add", y, bias)


def function_int8(opset: int) -> onnx.FunctionProto:
    """``squeeze::DenseSparseLinearInt8(X, Dq, Ds, Vq, Vs, I)``: dequantize, then the float body."""
    nodes = [
        helper.make_node("CastLike", ["Dq", "Ds"], ["Dq_f"]),
        helper.make_node("Mul", ["Dq_f", "Ds"], ["D"]),
        helper.make_node("CastLike", ["Vq", "Vs"], ["Vq_f"]),
        helper.make_node("Mul", ["Vq_f", "Vs"], ["V"]),
        *_body(),
    ]
    return helper.make_function(
        DOMAIN, ONNX_OP_INT8, ["X", "Dq", "Ds", "Vq", "Vs", "I"], ["Y"], nodes, [helper.make_opsetid("", opset)]
    )


def random_factors(gen: torch.Generator, d_out: int, d_in: int, k: int, s: int, idx_dtype: torch.dtype):
    """D, values, indices with exactly s distinct rows per column (used by examples and tests)."""
    dense = torch.randn(d_out, k, generator=gen) / k**0.5
    values = torch.randn(s, d_in, generator=gen)
    rows = torch.rand(k, d_in, generator=gen).argsort(0)[:s].sort(0).values.to(idx_dtype)
    return dense, values, rows


def examples(gen: torch.Generator) -> list[tuple]:
    out = []
    for lead, d_in, d_out, k, s, dt, bias in (
        ((2, 5), 16, 8, 6, 2, torch.uint8, True),
        ((3,), 32, 24, 12, 12, torch.int16, False),
        ((1, 7), 64, 48, 300, 5, torch.int16, True),
    ):
        dense, values, rows = random_factors(gen, d_out, d_in, k, s, dt)
        b = torch.randn(d_out, generator=gen) if bias else None
        out.append((torch.randn(*lead, d_in, generator=gen), dense, values, rows, b))
    return out


def quantize_rows(t: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest codes (int8 container) and one scale per row, shape (rows, 1)."""
    qmax = 2 ** (bits - 1) - 1
    scale = t.abs().amax(1, keepdim=True).clamp_min(1e-12) / qmax
    return torch.round(t / scale).clamp(-qmax, qmax).to(torch.int8), scale.to(t.dtype)


def examples_int8(gen: torch.Generator) -> list[tuple]:
    out = []
    for x, dense, values, rows, b in examples(gen):
        dq, ds = quantize_rows(dense)
        vq, vs = quantize_rows(values.t())
        out.append((x, dq, ds, vq.t().contiguous(), vs.t().contiguous(), rows, b))
    return out


KERNEL = Kernel(
    name="dense_sparse_linear",
    onnx_op=ONNX_OP,
    domain=DOMAIN,
    summary="dense D (out, k) times column-sparse S (k, in, s non-zeros per column, values + indices): DSFormer",
    reference=reference,
    symbolic=symbolic,
    examples=examples,
    function=function,
    tensorrt_plugin="SqueezeDenseSparseLinear",
    tensorrt_plugin_version="1",
    tensorrt_note="sparse-dense then dense GEMM; the plugin is not shipped with TensorRT",
    tolerance=1e-5,  # measured 2e-6 (MLAS vs PyTorch accumulation order over k = 300)
)


KERNEL_INT8 = Kernel(
    name="dense_sparse_linear_int8",
    onnx_op=ONNX_OP_INT8,
    domain=DOMAIN,
    summary="dense x sparse with int8 D (per output channel) and int8 S values (per column of S): DSFormer + int8",
    reference=reference_int8,
    symbolic=symbolic_int8,
    examples=examples_int8,
    function=function_int8,
    tensorrt_plugin="SqueezeDenseSparseLinearInt8",
    tensorrt_plugin_version="1",
    tensorrt_note="dequantize D and the S values, then as dense_sparse_linear; the plugin is not shipped with TensorRT",
    tolerance=1e-5,  # the same float arithmetic after an exact dequantization as dense_sparse_linear
)
