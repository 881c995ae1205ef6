"""TensorRT readiness, statically (TensorRT cannot be installed on these machines).

:func:`tensorrt_readiness` checks every node's op type against TensorRT's ONNX-parser support
list (kept as data, compress/data/tensorrt_ops.json), custom-domain nodes against the kernel
registry's plugin mappings, int64 initializers, dynamic inputs, and QDQ that TensorRT refuses:

TensorRT's explicit quantization takes symmetric int8 Q/DQ only: a ``QuantizeLinear`` /
``DequantizeLinear`` with a uint8 zero point (what a static W8A8 graph with uint8 activations
carries) or a non-zero zero point does not build, whatever the operator list says. The zero
point may be an initializer, a Constant node, or, inside squeeze's local functions, a function
input bound at the call site; all three are followed.

:func:`grouped` turns one line per node into one line per problem with its count and one fix.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from squeeze.compress.errors import SqueezeError

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
    for node in graph.node:  # in graph order: an Identity of a shared initializer follows it
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in out:  # the exporter's deduplicated constants
            out[node.output[0]] = out[node.input[0]]
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


def read_onnx(path: Path) -> onnx.ModelProto:
    """A graph file that is really a graph: onnx.load reads 0 bytes as an empty model, which any
    check would then call ready."""
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:  # protobuf's and onnx's own exception types
        raise SqueezeError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node or not proto.graph.output:
        raise SqueezeError(f"{path}: an empty ONNX graph ({path.stat().st_size} bytes), nothing to check")
    return proto


def tensorrt_ops() -> dict[str, Any]:
    """TensorRT's ONNX-parser operator support, kept as data (compress/data/tensorrt_ops.json)."""
    return json.loads(resources.files("squeeze.compress").joinpath("data/tensorrt_ops.json").read_text())


def tensorrt_readiness(model: onnx.ModelProto) -> dict[str, Any]:
    """What TensorRT's ONNX parser would refuse in a graph, without TensorRT.

    Checks every node's op type against the supported list; custom-domain nodes need a
    TensorRT plugin mapping (from the kernel registry) or a local function whose body parses;
    ORT contrib ops (com.microsoft) never parse; int64 initializers must fit in int32 (TensorRT
    casts them); dynamic input dimensions need an optimization profile at engine build time.
    """
    from squeeze.kernels.registry import KERNELS

    ops = tensorrt_ops()
    supported = set(ops["supported"])
    plugins = {getattr(k, "onnx_op", name): getattr(k, "tensorrt_plugin", None) for name, k in KERNELS.items()}
    functions = {(f.domain, f.name): f for f in model.functions}
    problems: list[str] = []
    notes: list[str] = []
    counts: dict[str, int] = {}

    def visit(nodes, where: str) -> None:
        for node in nodes:
            key = f"{node.domain or 'ai.onnx'}::{node.op_type}"
            counts[key] = counts.get(key, 0) + 1
            if node.domain in ("", "ai.onnx"):
                if node.op_type not in supported:
                    problems.append(
                        f"{node.op_type} ({where}node {node.name or '?'}) is not supported by the TensorRT ONNX parser"
                    )
                elif node.op_type in ops.get("notes", {}):
                    notes.append(f"{node.op_type}: {ops['notes'][node.op_type]}")
            elif node.domain == "com.microsoft":
                problems.append(f"{key}: ONNX Runtime contrib op, TensorRT has no parser for it")
            elif plugins.get(node.op_type):
                notes.append(f"{key} maps to TensorRT plugin {plugins[node.op_type]}")
            elif (node.domain, node.op_type) in functions:
                visit(functions[(node.domain, node.op_type)].node, f"function {node.op_type}: ")
            else:
                problems.append(f"{key}: custom op with no TensorRT plugin mapping and no function body")

    visit(model.graph.node, "")
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT64:
            arr = onnx.numpy_helper.to_array(init)
            if arr.size and (arr.max() > np.iinfo(np.int32).max or arr.min() < np.iinfo(np.int32).min):
                problems.append(
                    f"int64 initializer {init.name} holds values outside int32 (TensorRT casts int64 to int32)"
                )
    profile: dict[str, list[str]] = {}
    for inp in model.graph.input:
        dims = [d.dim_param or str(d.dim_value) for d in inp.type.tensor_type.shape.dim]
        if any(d.dim_param for d in inp.type.tensor_type.shape.dim):
            profile[inp.name] = dims
    if profile:
        notes.append(
            "dynamic inputs need an optimization profile: "
            + ", ".join(f"{k}[{'x'.join(v)}]" for k, v in profile.items())
            + " (trtexec --minShapes/--optShapes/--maxShapes)"
        )
    problems = grouped(problems + qdq_problems(model))  # one line per problem, with its fix
    return {
        "ok": not problems,
        "problems": problems,
        "notes": sorted(set(notes)),
        "dynamic_inputs": profile,
        "op_counts": counts,
        "tensorrt_version": ops.get("tensorrt_version"),
        "source": ops.get("source"),
    }
