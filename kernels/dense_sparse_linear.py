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
"""

from __future__ import annotations

import onnx
import torch
from onnx import TensorProto, helper
from torch.onnx import symbolic_helper as sh

from squeeze.kernels.base import DOMAIN, Kernel

ONNX_OP = "DenseSparseLinear"


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


def function(opset: int) -> onnx.FunctionProto:
    """``squeeze::DenseSparseLinear(X, D, V, I)``: densify S by ScatterElements, two MatMuls."""
    nodes = [
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
    return helper.make_function(DOMAIN, ONNX_OP, ["X", "D", "V", "I"], ["Y"], nodes, [helper.make_opsetid("", opset)])


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
