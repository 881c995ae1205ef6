"""ONNX export, validation against PyTorch, and the static TensorRT readiness check.

``export_onnx`` writes an opset-18 graph with dynamic batch (and sequence) axes, then runs the
same inputs through PyTorch and ONNX Runtime on two shapes (so the dynamic axes are exercised)
and compares every output with ``|ort - torch| <= atol + rtol * |torch|``. Beyond tolerance it
raises :class:`ValidationFailed` (exit code 1) naming the output and the error; Optimum only
warns, and its users lose hours to that. The report is written next to the model either way
(``model.onnx.report.json``); a rejected graph is kept as ``model.rejected.onnx``, never under
the requested name.

The TorchScript exporter is the default: on this machine it exports all-MiniLM-L6-v2 in ~1.3 s
against ~5 s for the dynamo exporter, with the same validation error (4e-6); ``exporter=
"dynamo"`` is available. Custom operators of ``squeeze.kernels`` keep their node in the graph,
with a local ONNX function that stock onnxruntime runs (``plain=True`` inlines them).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import nn

from squeeze.compress.calibration import Batch, DataSpec, batches
from squeeze.compress.checkpoint import Checkpoint
from squeeze.compress.errors import SqueezeError, ValidationFailed
from squeeze.compress.evaluate import model_outputs, ort_latency_ms, ort_session
from squeeze.compress.passes import export_rule
from squeeze.compress.paths import check_output, sweep_stale, temp_name

log = logging.getLogger(__name__)

Target = Literal["ort", "tensorrt"]
DEFAULT_ATOL = 1e-4  # fp32 exports of MiniLM measured 4.2e-6 max abs error here
DEFAULT_RTOL = 1e-3
OPSETS = range(14, 21)  # the TorchScript exporter's range; dynamo emits 18+


class ExportWrapper(nn.Module):
    """Positional tensors in, the family's output tensors out (what ONNX sees)."""

    def __init__(self, model: nn.Module, input_names: list[str], output_name: str, causal: bool):
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.output_name = output_name
        self.causal = causal

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = dict(zip(self.input_names, tensors))
        if self.causal:
            kwargs["use_cache"] = False
        out = self.model(**kwargs, return_dict=True)
        return getattr(out, self.output_name)


def _validation_batches(ckpt: Checkpoint, batch: int, seq_len: int, data: DataSpec | None) -> list[Batch]:
    """Two input sets of different shapes, built from the family's data (tokenized built-in
    text, or images), so validation exercises the dynamic axes."""
    spec = (data or DataSpec()).model_copy(
        update={"samples": batch + 1, "eval_samples": batch + 1, "seq_len": seq_len * 2, "batch_size": batch + 1}
    )
    source = batches(ckpt, spec, split="eval", warn=log.info)[0]
    names = input_names(ckpt)
    out: list[Batch] = []
    for b, s in ((batch, seq_len), (batch + 1, seq_len * 2)):
        cut: Batch = {}
        for name in names:
            t = source.get(name)
            if t is None:  # e.g. token_type_ids from a tokenizer that does not emit them
                t = torch.zeros_like(source["input_ids"])
            t = t[:b]
            if t.ndim == 2:
                t = _fit(t, s, pad=0)
            cut[name] = t.contiguous()
        if "attention_mask" in cut:
            cut["attention_mask"][:, 0] = 1  # never an all-padding row
        out.append(cut)
    return out


def _fit(t: torch.Tensor, length: int, pad: int) -> torch.Tensor:
    if t.shape[1] >= length:
        return t[:, :length]
    return torch.cat([t, torch.full((t.shape[0], length - t.shape[1]), pad, dtype=t.dtype)], dim=1)


def input_names(ckpt: Checkpoint) -> list[str]:
    return list(ckpt.family.model_inputs)


def _check_options(
    opset: int, atol: float, rtol: float, batch: int, seq_len: int, exporter: str, ckpt: Checkpoint
) -> None:
    if exporter not in ("torchscript", "dynamo"):
        raise SqueezeError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    if exporter == "torchscript" and opset not in OPSETS:
        raise SqueezeError(f"opset must be between {OPSETS.start} and {OPSETS.stop - 1}, got {opset}")
    if exporter == "dynamo" and opset < 18:
        raise SqueezeError(f"the dynamo exporter emits opset 18 or newer, got {opset}")
    if not (0 < atol < 1e3) or not (0 <= rtol < 1e3):
        raise SqueezeError(f"tolerances must be positive and sane (atol={atol}, rtol={rtol})")
    if not 1 <= batch <= 1024:
        raise SqueezeError(f"batch must be between 1 and 1024, got {batch}")
    max_pos = ckpt.family.max_positions(ckpt.model.config) or 0
    if ckpt.family.modality == "text" and not 1 <= seq_len * 2 <= (max_pos or 1 << 20):
        raise SqueezeError(
            f"seq-len must be between 1 and {max_pos // 2} for this model (validation also runs 2x), got {seq_len}"
        )


def _torch_export(
    wrapper: nn.Module,
    args: tuple,
    names: list[str],
    output: str,
    path: Path,
    *,
    opset: int,
    exporter: str,
    vision: bool,
) -> None:
    from squeeze.kernels.registry import torchscript_symbolics

    dyn = {n: ({0: "batch"} if vision else {0: "batch", 1: "sequence"}) for n in names}
    dyn[output] = {0: "batch"} if vision else {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            with torchscript_symbolics(opset):
                torch.onnx.export(
                    wrapper,
                    args,
                    str(path),
                    input_names=names,
                    output_names=[output],
                    dynamic_axes=dyn,
                    opset_version=opset,
                    dynamo=False,
                    do_constant_folding=True,
                )
        else:
            dims = {n: {ax: torch.export.Dim.AUTO for ax in d} for n, d in dyn.items() if n in names}
            prog = torch.onnx.export(
                wrapper,
                args,
                input_names=names,
                output_names=[output],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=(tuple(dims[n] for n in names),),
                verbose=False,
            )
            assert prog is not None  # dynamo=True always returns an ONNXProgram
            prog.save(str(path), external_data=False)


def compare(name: str, ort_out: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """Element-wise and statistical agreement of one output."""
    if ort_out.shape != ref.shape:
        return {"output": name, "ok": False, "error": f"shape {ort_out.shape} != {ref.shape}"}
    # NaN makes every `diff > bound` false: non-finite values fail on either side, by count
    bad_ort, bad_ref = int((~np.isfinite(ort_out)).sum()), int((~np.isfinite(ref)).sum())
    if bad_ort or bad_ref:
        side = "PyTorch" if bad_ref else "ONNX Runtime"
        return {
            "output": name,
            "ok": False,
            "nonfinite_torch": bad_ref,
            "nonfinite_ort": bad_ort,
            "error": f"{side} output holds {bad_ref or bad_ort} non-finite value(s) (NaN/inf)",
        }
    diff = np.abs(ort_out.astype(np.float64) - ref.astype(np.float64))
    bound = atol + rtol * np.abs(ref.astype(np.float64))
    bad = diff > bound
    a, b = ort_out.reshape(-1).astype(np.float64), ref.reshape(-1).astype(np.float64)
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    worst = np.unravel_index(int(np.argmax(diff - bound)), diff.shape)
    return {
        "output": name,
        "ok": bool(not bad.any()),
        "max_abs": float(diff.max()),
        "max_rel": float((diff / (np.abs(ref) + 1e-12)).max()),
        "mean_abs": float(diff.mean()),
        "cosine": cos,
        "mismatched": int(bad.sum()),
        "elements": int(bad.size),
        "worst_index": [int(i) for i in worst],
    }


def export_onnx(
    ckpt: Checkpoint,
    out: str | Path,
    *,
    opset: int = 18,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    batch: int = 2,
    seq_len: int = 16,
    target: Target = "ort",
    force: bool = False,
    exporter: str = "torchscript",
    plain: bool = False,
    data: DataSpec | None = None,
    reference: Checkpoint | None = None,
    latency: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Export a checkpoint to ONNX and validate it; return the report (also written as JSON).

    Raises:
        SqueezeError: bad options, existing output without ``force``.
        ValidationFailed: ORT disagrees with PyTorch beyond tolerance, or ``target="tensorrt"``
            and the readiness check finds something TensorRT would not parse.
    """
    out = Path(out)
    if target not in ("ort", "tensorrt"):
        raise SqueezeError(f"target must be 'ort' or 'tensorrt', got {target!r}")
    if out.suffix != ".onnx":
        raise SqueezeError(f"{out}: the output file must end in .onnx")
    _check_options(opset, atol, rtol, batch, seq_len, exporter, ckpt)
    if reference is not None and reference.family.name != ckpt.family.name:  # was silently ignored
        raise SqueezeError(f"--ref is a {reference.family.name} model, the checkpoint a {ckpt.family.name} model")
    rejected = out.with_name(out.stem + ".rejected.onnx")
    report_path = out.with_name(out.name + ".report.json")
    out = Path(check_output(out, [ckpt.source, reference.source if reference else None], force=force, kind="file"))
    for side in (rejected, report_path):  # the evidence of an earlier export is not overwritten silently
        if side.exists() and not force:
            raise SqueezeError(f"{side} already exists (from an earlier export); pass --force to overwrite it")
        if side.is_dir():
            raise SqueezeError(f"{side}: is a folder; remove it or name another output")

    model = ckpt.model.eval()
    names = input_names(ckpt)
    inputs = _validation_batches(ckpt, batch, seq_len, data)
    output = next(iter(model_outputs(model, ckpt.family, inputs[0])))
    wrapper = ExportWrapper(model, names, output, ckpt.family.causal).eval()
    # paths in the report are relative to it (the graph lies beside it): no temp or host paths
    report: dict[str, Any] = {
        "model": out.name,
        "checkpoint": str(ckpt.source) if ckpt.source else None,
        "family": ckpt.family.name,
        "opset": opset,
        "exporter": exporter,
        "atol": atol,
        "rtol": rtol,
        "inputs": names,
        "outputs": [output],
    }
    start = time.perf_counter()
    stage = progress or (lambda label, done, total: None)  # (label, done, total), as PassContext.progress
    stage("export: tracing the model", 0, 3)
    rejected = out.with_name(out.stem + ".rejected.onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    tmp = temp_name(out)
    try:
        try:
            _torch_export(
                wrapper,
                tuple(inputs[0][n] for n in names),
                names,
                output,
                tmp,
                opset=opset,
                exporter=exporter,
                vision=ckpt.family.modality == "vision",
            )
        except SqueezeError:
            raise
        except Exception as exc:  # an exporter failure on a supported model is a bug: keep the trace
            raise RuntimeError(f"ONNX export failed: {exc}") from exc
        from squeeze.kernels.registry import finalize_onnx

        proto = finalize_onnx(onnx.load(str(tmp)), plain=plain)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        report["export_seconds"] = round(time.perf_counter() - start, 3)
        report["bytes"] = tmp.stat().st_size
        report["custom_ops"] = sorted(
            {f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
        )

        stage("export: validating with ONNX Runtime", 1, 3)
        session = ort_session(tmp)
        # The exporter drops inputs the graph never reads (e.g. attention_mask once every
        # attention layer is pruned): feed only what the graph declares.
        graph_inputs = [i.name for i in session.get_inputs()]
        report["inputs"] = graph_inputs
        # Elementwise tolerances do not suit a quantized graph (one rounding flip cascades, see
        # compress/quant/onnx_check.py): it is checked by cosine and relative max error instead.
        own_rule = export_rule(ckpt.manifest.edits)  # asked from the passes that made the model
        rule = own_rule.model_dump() if own_rule is not None else None
        report["rule"] = rule or {"atol": atol, "rtol": rtol}
        checks = []
        ort_outputs = []
        for inp in inputs:
            got = session.run(None, {n: inp[n].numpy() for n in graph_inputs})[0]
            ort_outputs.append(got)
            with torch.no_grad():
                want = wrapper(*(inp[n] for n in names)).float().numpy()
            shape = "x".join(str(d) for d in inp[names[0]].shape)
            check = {**compare(output, got, want, atol, rtol), "shape": shape}
            if rule is not None and "error" not in check:  # a quantized graph: judged by its rule, stats kept
                verdict = own_rule.check(got, want)
                check.update(ok=verdict["ok"], max_abs_ratio=verdict["max_abs_ratio"], rule=rule)
            checks.append(check)
        report["validation"] = checks
        report["ok"] = all(c["ok"] for c in checks)
        if reference is not None:
            report["fidelity_vs_reference"] = _fidelity(reference, inputs, names, ort_outputs, output)
        stage("export: measuring", 2, 3)
        if latency:
            feeds = {n: inputs[0][n].numpy() for n in graph_inputs}
            report["latency_ms"] = round(ort_latency_ms(session, feeds, warmup=3, runs=10), 3)
        if target == "tensorrt":
            report["tensorrt"] = tensorrt_readiness(proto)
        failed_validation = not report["ok"]
        failed_trt = target == "tensorrt" and not report["tensorrt"]["ok"]
        if failed_validation or failed_trt:
            os.replace(tmp, rejected)
            report["rejected_model"] = rejected.name
        else:
            os.replace(tmp, out)
            rejected.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
    _write_report(out, report)
    stage("export: done", 3, 3)
    if failed_validation:
        bad = next(c for c in checks if not c["ok"])
        if "rule" in bad:
            detail = (
                f"cosine {bad['cosine']:.5f} (needs >= {bad['rule']['min_cosine']}), max abs / max |twin| "
                f"{bad['max_abs_ratio']:.3g} (needs <= {bad['rule']['max_abs_ratio']}) at shape {bad['shape']}"
            )
        else:
            detail = (f"{bad['error']} at shape {bad['shape']}" if "error" in bad else None) or (
                f"max abs {bad['max_abs']:.3g}, max rel {bad['max_rel']:.3g}, {bad['mismatched']}/{bad['elements']} "
                f"elements beyond atol={atol:g} rtol={rtol:g} at shape {bad['shape']}"
            )
        raise ValidationFailed(f"validation failed: output '{bad['output']}': {detail} (report: {out}.report.json)")
    if failed_trt:
        raise ValidationFailed("TensorRT would not parse this graph: " + "; ".join(report["tensorrt"]["problems"][:5]))
    return report


def _fidelity(
    reference: Checkpoint, inputs: list[Batch], names: list[str], ort_outputs: list[np.ndarray], output: str
) -> dict[str, float]:
    from squeeze.compress.evaluate import Reference, compare_outputs, reference_outputs

    ref = reference_outputs(reference.model, reference.family, inputs)
    if output not in ref.outputs[0]:
        return {}
    new = Reference(
        family=reference.family, outputs=[{output: torch.from_numpy(o).float()} for o in ort_outputs], batches=inputs
    )
    return compare_outputs(ref, new)


def _write_report(out: Path, report: dict[str, Any]) -> None:
    path = out.with_name(out.name + ".report.json")
    tmp = temp_name(path)
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# TensorRT readiness (static; TensorRT cannot be installed on these machines)
# --------------------------------------------------------------------------------------------


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
    from squeeze.compress.export_trt import grouped, qdq_problems  # one line per problem, with its fix

    problems = grouped(problems + qdq_problems(model))
    return {
        "ok": not problems,
        "problems": problems,
        "notes": sorted(set(notes)),
        "dynamic_inputs": profile,
        "op_counts": counts,
        "tensorrt_version": ops.get("tensorrt_version"),
        "source": ops.get("source"),
    }
