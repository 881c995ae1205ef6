"""TensorRT readiness beyond the operator list: QDQ that TensorRT refuses, and a report grouped by problem.

TensorRT's explicit quantization takes symmetric int8 Q/DQ only: a ``QuantizeLinear`` /
``DequantizeLinear`` with a uint8 zero point (what a static W8A8 graph with uint8 activations
carries) or a non-zero zero point does not build, whatever the operator list says. The zero
point may be an initializer, a Constant node, or, inside squeeze's local functions, a function
input bound at the call site; all three are followed.

:func:`grouped` turns one line per node into one line per problem with its count and one fix.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import numpy_helper

_QDQ = ("QuantizeLinear", "DequantizeLinear")

FIXES = {
    "unsupported": "replace the operator (another opset, or --plain to inline squeeze kernels) or ship a TensorRT plugin",
    "contrib": "export without ONNX Runtime-only operators: no --optimize / --weights, integer kernels via Q/DQ",
    "custom": "re-export with --plain (squeeze kernels inlined into standard operators)",
    "int64": "keep int64 constants within int32 (TensorRT casts them)",
    "qdq": "quantize activations and weights to symmetric int8 (zero point 0, int8): TensorRT takes no other Q/DQ",
}


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def qdq_problems(model: onnx.ModelProto) -> list[str]:
    """Q/DQ nodes TensorRT would not build: uint8 or non-zero zero points."""
    functions = {(f.domain, f.name): f for f in model.functions}
    consts = _constants(model.graph)
    problems: list[str] = []

    def visit(nodes, bound: dict[str, np.ndarray], where: str) -> None:
        for node in nodes:
            if node.op_type in _QDQ and len(node.input) > 2 and node.input[2]:
                zp = bound.get(node.input[2])
                if zp is None:
                    continue
                if zp.dtype == np.uint8:
                    problems.append(f"{node.op_type} with a uint8 zero point ({where}node {node.name or '?'})")
                elif np.any(zp != 0):
                    problems.append(f"{node.op_type} with a non-zero zero point ({where}node {node.name or '?'})")
            fn = functions.get((node.domain, node.op_type))
            if fn is not None:
                inner = {
                    formal: bound[actual]
                    for formal, actual in zip(fn.input, node.input, strict=False)
                    if actual in bound
                }
                for n in fn.node:
                    if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                        inner[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
                visit(fn.node, inner, f"function {fn.name}: ")

    visit(model.graph.node, consts, "")
    return problems


def _kind(problem: str) -> tuple[str, str]:
    """(group key, kind) of one per-node problem line."""
    if " zero point " in problem:
        return problem.split(" (", 1)[0], "qdq"
    if problem.startswith("int64 initializer"):
        return "int64 initializers outside int32", "int64"
    m = re.match(r"^(\S+): ONNX Runtime contrib op", problem)
    if m:
        return f"{m.group(1)} (ONNX Runtime contrib op)", "contrib"
    m = re.match(r"^(\S+): custom op", problem)
    if m:
        return f"{m.group(1)} (custom op without a TensorRT plugin)", "custom"
    m = re.match(r"^(\S+) \(", problem)
    return (f"{m.group(1)} (not in the TensorRT ONNX parser)" if m else problem), "unsupported"


def grouped(problems: list[str]) -> list[str]:
    """One line per problem: what, how many nodes, and the fix."""
    groups: dict[str, tuple[str, int]] = {}
    for p in problems:
        key, kind = _kind(p)
        groups[key] = (kind, groups.get(key, (kind, 0))[1] + 1)
    return [f"{key}: {n} node(s); fix: {FIXES[kind]}" for key, (kind, n) in sorted(groups.items())]
