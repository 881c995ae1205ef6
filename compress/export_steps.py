"""The steps of ``export_folder._export`` (graphs other than the plain fp32 encoder): trace
(with or without the KV cache), finish (4/8-bit weights after fusion, tied weights once, fp16,
the requested opset) and validate against the PyTorch reference (prefill shapes and greedy
generation for a KV-cache graph).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from squeeze.compress.calibration import DataSpec
from squeeze.compress.checkpoint import Checkpoint
from squeeze.compress.evaluate import model_outputs, ort_latency_ms, ort_session
from squeeze.compress.export import ExportWrapper, _torch_export, input_names
from squeeze.compress.export_check import run_checks
from squeeze.compress.export_decoder import WITH_PAST, export_with_past, prefill_checks, prompts, validate_generation
from squeeze.compress.export_graph import share_tied_weights, to_fp16

TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter's last opset; higher ones are converted after


def reference_model(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    return copy.deepcopy(model).half().eval() if dtype == "fp16" else model


class Graph:
    """A traced graph and what validating it needs (names, output, the cache layout)."""

    def __init__(self, proto: onnx.ModelProto, names: list[str], output: str, layout: Any) -> None:
        self.proto, self.names, self.output, self.layout = proto, names, output, layout


def trace(
    ckpt: Checkpoint, model: torch.nn.Module, tmp: Path, kind: str, inputs: list, *, opset: int, plain: bool
) -> Graph:
    from squeeze.kernels.registry import finalize_onnx

    names = input_names(ckpt)
    if kind == WITH_PAST:
        layout = export_with_past(model, tmp, opset=opset)
        return Graph(finalize_onnx(onnx.load(str(tmp)), plain=plain), names, "logits", layout)
    output = next(iter(model_outputs(model, ckpt.family, inputs[0])))
    wrapper = ExportWrapper(model, names, output, ckpt.family.causal).eval()
    args = tuple(inputs[0][n] for n in names)
    vision = ckpt.family.modality == "vision"
    _torch_export(wrapper, args, names, output, tmp, opset=opset, exporter="torchscript", vision=vision)
    return Graph(finalize_onnx(onnx.load(str(tmp)), plain=plain), names, output, None)


def finish(proto: onnx.ModelProto, report: dict[str, Any], registry: Any, dtype: str, opset: int) -> onnx.ModelProto:
    """4/8-bit weights (after fusion), tied weights once, fp16, the requested opset."""
    if registry is not None:
        from squeeze.compress.export_nbits import rewrite

        proto, report["nbits"] = rewrite(proto, registry)
    proto, report["tied_bytes_saved"] = share_tied_weights(proto)
    if dtype == "fp16":
        proto = to_fp16(proto)
    if opset > TORCHSCRIPT_MAX_OPSET:
        from onnx import version_converter

        proto = version_converter.convert_version(proto, opset)
    return proto


def validate(
    ckpt: Checkpoint,
    reference: torch.nn.Module,
    graph: Graph,
    path: Path,
    inputs: list,
    report: dict[str, Any],
    check: Any,
    dtype: str,
    latency: bool,
    prompt: tuple[int, DataSpec | None, int],
) -> None:
    """The written graph against the PyTorch reference: prefill shapes and greedy generation for
    a KV-cache graph, both validation shapes otherwise. Fills ``report``."""
    session = ort_session(path)
    report["inputs"] = [i.name for i in session.get_inputs()]
    report["outputs"] = [o.name for o in session.get_outputs()]
    if graph.layout is not None:
        checks = prefill_checks(session, reference, inputs, check)
        seq_len, data, new = prompt
        ids, mask, pad = prompts(ckpt, seq_len, data)
        np_dtype = np.float16 if dtype == "fp16" else np.float32
        gen = validate_generation(
            session, reference, graph.layout, ids, mask, pad, new=new, dtype=np_dtype, judge=check
        )
        report.update(validation=checks, generation=gen, ok=gen["ok"] and all(c["ok"] for c in checks))
        report["cache_slots"] = [len(s) for s in graph.layout.slots]
        report["latency_ms"] = gen["ort_ms_per_token"]
        return
    wrapper = ExportWrapper(reference, graph.names, graph.output, ckpt.family.causal).eval()
    checks, _ = run_checks(session, wrapper, inputs, graph.names, graph.output, check)
    report.update(validation=checks, ok=all(c["ok"] for c in checks))
    if latency:
        feeds = {n: inputs[0][n].numpy() for n in report["inputs"]}
        report["latency_ms"] = round(ort_latency_ms(session, feeds, warmup=3, runs=10), 3)
