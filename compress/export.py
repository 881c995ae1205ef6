"""ONNX export and validation against PyTorch.

``export_onnx`` writes an opset-18 graph with dynamic batch (and sequence) axes, then runs the
same inputs through PyTorch and ONNX Runtime on two shapes (so the dynamic axes are exercised)
and compares every output with ``|ort - torch| <= atol + rtol * |torch|`` (compress/export_check.py).
Beyond tolerance it raises :class:`ValidationFailed` (exit code 1) naming the output and the
error; Optimum only warns, and its users lose hours to that. The report is written next to the
model either way (``model.onnx.report.json``); a rejected graph is kept as
``model.rejected.onnx``, never under the requested name. ``optimize=True`` fuses the graph with
ONNX Runtime's transformer optimizer first (compress/export_fuse.py) and validates the fused one.

The TorchScript exporter is the default: on this machine it exports all-MiniLM-L6-v2 in ~1.3 s
against ~5 s for the dynamo exporter, with the same validation error (4e-6); ``exporter=
"dynamo"`` is available. Custom operators of ``squeeze.kernels`` keep their node in the graph,
with a local ONNX function that stock onnxruntime runs (``plain=True`` inlines them). The static
TensorRT readiness check lives in compress/export_trt.py (re-exported here).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
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
from squeeze.compress.export_check import compare, custom_ops, failure, judge, report_head, run_checks, write_report
from squeeze.compress.export_trt import read_onnx, tensorrt_ops, tensorrt_readiness
from squeeze.compress.passes import export_rule
from squeeze.compress.paths import check_output, sweep_stale, temp_name

__all__ = [  # compare and the TensorRT check moved out; importers of compress.export still find them
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "ExportWrapper",
    "compare",
    "export_onnx",
    "input_names",
    "read_onnx",
    "tensorrt_ops",
    "tensorrt_readiness",
]

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
    optimize: bool = False,
    fuse_attention: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Export a checkpoint to ONNX and validate it; return the report (also written as JSON).

    ``optimize``: fuse with ONNX Runtime's transformer optimizer (``fuse_attention`` False keeps
    the q/k/v MatMuls); ``progress(label, done, total)`` is told each stage.

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

    from squeeze.compress.export_fuse import eager_attention, fuse_file

    model = ckpt.model.eval()
    names = input_names(ckpt)
    inputs = _validation_batches(ckpt, batch, seq_len, data)
    output = next(iter(model_outputs(model, ckpt.family, inputs[0])))
    wrapper = ExportWrapper(model, names, output, ckpt.family.causal).eval()
    report = report_head(
        out, ckpt, opset=opset, exporter=exporter, atol=atol, rtol=rtol, inputs=names, outputs=[output]
    )
    stages = ["tracing the model"] + ["fusing (ONNX Runtime optimizer)"] * optimize
    stages += ["validating with ONNX Runtime", "measuring", "done"]
    tell = progress or (lambda label, done, total: None)  # (label, done, total), as PassContext.progress

    def stage(what: str) -> None:
        tell(f"export: {what}", stages.index(what), len(stages) - 1)

    start = time.perf_counter()
    stage("tracing the model")
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    tmp = temp_name(out)
    try:
        with eager_attention(model, optimize) as kept:  # validated with the attention it was traced with
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
            if optimize:
                stage("fusing (ONNX Runtime optimizer)")
                fused, report["fused"], line = fuse_file(
                    tmp, ckpt.family, model.config, attention=fuse_attention, keep_gather=False
                )
                report["fusion"] = f"{line}; {kept}" if kept else line
                if fused is not None:
                    proto = fused
                    onnx.save(proto, str(tmp))
            report["export_seconds"] = round(time.perf_counter() - start, 3)
            report["bytes"] = tmp.stat().st_size
            report["custom_ops"] = custom_ops(proto)

            stage("validating with ONNX Runtime")
            session = ort_session(tmp)
            report["inputs"] = [i.name for i in session.get_inputs()]
            # a quantized graph is judged by its passes' rule (cosine, relative max error): one
            # rounding flip cascades elementwise (compress/passes/quantize/onnx_check.py)
            own_rule = export_rule(ckpt.manifest.edits)
            rule = own_rule.model_dump() if own_rule is not None else None
            report["rule"] = rule or {"atol": atol, "rtol": rtol}
            checks, ort_outputs = run_checks(session, wrapper, inputs, names, output, judge(atol, rtol, rule))
        report["validation"] = checks
        report["ok"] = all(c["ok"] for c in checks)
        if reference is not None:
            report["fidelity_vs_reference"] = _fidelity(reference, inputs, names, ort_outputs, output)
        stage("measuring")
        if latency:
            feeds = {n: inputs[0][n].numpy() for n in report["inputs"]}
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
    write_report(out, report)
    stage("done")
    if failed_validation:
        raise ValidationFailed(failure(report, out))
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
