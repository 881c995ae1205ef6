"""``squeeze export``'s front door: task, dtype, 4/8-bit weights and Optimum-style folders.

``export_model`` picks the graph (``text-generation-with-past`` for causal LMs with a head, see
``compress/export_decoder.py``; today's graph otherwise) and the finishing steps, then validates
the file it writes like every squeeze export does (exit 1 and ``*.rejected.onnx`` beyond
tolerance):

* ``dtype="fp16"``: traced in fp32, converted by ONNX Runtime's converter, validated against the
  fp16 PyTorch model with :data:`FP16_ATOL` / :data:`FP16_RTOL`.
* ``weights="int4"|"int8"``: ``MatMulNBits`` / ``GatherBlockQuantized`` (compress/export_nbits.py),
  validated against the PyTorch twin computing with the same dequantized weights.
* tied weights are stored once, external data past 2 GB (compress/export_graph.py), opset up to
  :data:`MAX_OPSET`.
* ``out`` without ``.onnx``: a folder as Optimum writes it (``model.onnx`` [+ ``model.onnx.data``],
  ``config.json``, ``generation_config.json``, tokenizer / processor files), which
  ``ORTModelForCausalLM.from_pretrained`` / ``ORTModelForFeatureExtraction`` read directly.

* ``optimize``: ONNX Runtime's transformer fusions, by default for the encoders its optimizer
  knows, with one line in the report whatever is decided (compress/export_fuse.py); a default
  fused graph that fails validation is exported again unfused.

A plain fp32 encoder export goes through ``export_onnx``; the other graphs through ``_export``
(its steps: compress/export_steps.py). Both validate and report through compress/export_check.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from squeeze.compress.calibration import DataSpec
from squeeze.compress.checkpoint import Checkpoint, copy_side_files
from squeeze.compress.errors import SqueezeError, ValidationFailed
from squeeze.compress.export import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    _validation_batches,
    export_onnx,
)
from squeeze.compress.export_check import custom_ops, failure, judge, report_head, write_report
from squeeze.compress.export_decoder import (
    NEW_TOKENS,
    resolve_task,
)
from squeeze.compress.export_fuse import Plan, eager_attention, fuse_file, plan
from squeeze.compress.export_graph import save
from squeeze.compress.export_steps import TORCHSCRIPT_MAX_OPSET, finish, reference_model, trace, validate
from squeeze.compress.passes.quantize.onnx_check import validation_rule
from squeeze.compress.paths import check_output

DTYPES = ("fp32", "fp16")
WEIGHTS = ("int4", "int8")
# fp16 graph vs the fp16 PyTorch model: tiny BERT measured max abs 5.9e-3 on outputs up to 3.4,
# tiny gpt2 2.7e-4, tiny llama 4.0e-4 (fp16 rounding differs between the two runtimes)
FP16_ATOL = 2e-2
FP16_RTOL = 1e-2
MAX_OPSET = onnx.defs.onnx_opset_version()  # 28 with onnx 1.23; onnxruntime 1.32 ran every one of 21..28


def _check(
    dtype: str,
    weights: str | None,
    block_size: int,
    opset: int,
    new_tokens: int,
    batch: int,
    seq_len: int,
    ckpt: Checkpoint,
) -> None:
    if dtype not in DTYPES:
        raise SqueezeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if weights is not None and weights not in WEIGHTS:
        raise SqueezeError(f"weights must be int4 or int8 (MatMulNBits), got {weights!r}")
    if block_size < 16 or block_size & (block_size - 1):
        raise SqueezeError(f"block size must be a power of two >= 16 (MatMulNBits), got {block_size}")
    if not 14 <= opset <= MAX_OPSET:
        raise SqueezeError(f"opset must be between 14 and {MAX_OPSET}, got {opset}")
    if not 1 <= new_tokens <= 4096:
        raise SqueezeError(f"new tokens must be between 1 and 4096, got {new_tokens}")
    if not 1 <= batch <= 1024:
        raise SqueezeError(f"batch must be between 1 and 1024, got {batch}")
    max_pos = ckpt.family.max_positions(ckpt.config) or 1 << 20
    extra = new_tokens if ckpt.family.causal else 0  # the generation check's new tokens
    if ckpt.family.modality == "text" and not 1 <= seq_len * 2 + extra <= max_pos:
        raise SqueezeError(
            f"seq-len must be between 1 and {(max_pos - extra) // 2} for this model (validation also runs 2x"
            f"{f', and generates {extra} tokens' if extra else ''}), got {seq_len}"
        )


def export_model(
    ckpt: Checkpoint,
    out: str | Path,
    *,
    task: str | None = "auto",
    dtype: str = "fp32",
    weights: str | None = None,
    block_size: int = 32,
    opset: int = 18,
    atol: float | None = None,
    rtol: float | None = None,
    batch: int = 2,
    seq_len: int = 16,
    force: bool = False,
    data: DataSpec | None = None,
    new_tokens: int = NEW_TOKENS,
    external: bool | None = None,
    optimize: bool | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    **legacy: Any,
) -> dict[str, Any]:
    """Export ``ckpt`` to ``out`` (a ``.onnx`` file, or an Optimum-style folder); return the report.

    ``optimize``: None fuses the encoders ONNX Runtime's optimizer knows (compress/export_fuse.py),
    True insists (fails on others), False never fuses. ``legacy`` takes ``export_onnx``'s other
    options (target, exporter, plain, reference, latency).
    """
    out = Path(out)
    _check(dtype, weights, block_size, opset, new_tokens, batch, seq_len, ckpt)
    kind = resolve_task(task, ckpt)
    folder = None if out.suffix == ".onnx" else out
    sources = [ckpt.source, getattr(legacy.get("reference"), "source", None)]
    how = plan(
        optimize, ckpt.family.name, ckpt.family.causal, kind, target=legacy.get("target", "ort"), weights=weights
    )
    if folder is not None:  # an existing folder needs --force; its model.onnx is then replaced
        folder = check_output(folder, sources, force=force, kind="dir")
        force = True
    file = out if folder is None else folder / "model.onnx"
    opts = dict(dtype=dtype, weights=weights, block_size=block_size, opset=opset, atol=atol, rtol=rtol)
    opts.update(batch=batch, seq_len=seq_len, data=data, new_tokens=new_tokens, external=external)
    try:
        report = _route(ckpt, file, folder, kind, how, force, sources, progress, opts, legacy)
    except ValidationFailed as exc:
        if not (how.on and how.auto) or _torch_nonfinite(file):  # NaN in PyTorch: not fusion's doing
            raise
        # the default's fused graph failed: the unfused graph, and the reason, recorded
        note = f"not fused: the fused graph failed validation ({str(exc).split(' (report:')[0]}); written unfused"
        report = _route(
            ckpt, file, folder, kind, Plan(on=False, auto=True, note=note), True, sources, progress, opts, legacy
        )
    if folder is not None:
        report["folder"] = write_side_files(ckpt, folder)
        write_report(file, report)
    return report


def _torch_nonfinite(file: Path) -> bool:
    """Whether the rejected export's report found non-finite values on PyTorch's side."""
    import json

    report = json.loads(file.with_name(file.name + ".report.json").read_text())
    return any(c.get("nonfinite_torch") for c in report.get("validation", []))


def _route(
    ckpt: Checkpoint,
    file: Path,
    folder: Path | None,
    kind: str,
    how: Plan,
    force: bool,
    sources: list,
    progress: Callable[[str, int, int], None] | None,
    opts: dict[str, Any],
    legacy: dict[str, Any],
) -> dict[str, Any]:
    """The plain fp32 encoder graph through ``export_onnx``; everything else through ``_export``."""
    plain_path = (
        kind == "default"
        and opts["dtype"] == "fp32"
        and opts["weights"] is None
        and opts["opset"] <= TORCHSCRIPT_MAX_OPSET
    )
    if plain_path:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        keys = ("opset", "batch", "seq_len", "data")
        report = export_onnx(
            ckpt,
            file,
            atol=opts["atol"] or DEFAULT_ATOL,
            rtol=opts["rtol"] or DEFAULT_RTOL,
            force=force,
            optimize=how.on,
            fuse_attention=how.attention,
            progress=progress,
            **{k: opts[k] for k in keys},
            **legacy,
        )
        report["task"] = "default"
    else:
        if (
            legacy.get("reference") is not None
            or legacy.get("target", "ort") != "ort"
            or legacy.get("exporter", "torchscript") != "torchscript"
        ):
            raise SqueezeError(
                "--ref, --target tensorrt and --exporter dynamo apply to the fp32 graph without a KV cache "
                "(use --task feature-extraction or text-generation)"
            )
        file = check_output(file, sources, force=force, kind="file")
        for side in (file.with_name(file.stem + ".rejected.onnx"), file.with_name(file.name + ".report.json")):
            if side.exists() and not force:
                raise SqueezeError(f"{side} already exists (from an earlier export); pass --force to overwrite it")
        report = _export(
            ckpt,
            file,
            kind=kind,
            how=how,
            plain=bool(legacy.get("plain", False)),
            latency=bool(legacy.get("latency", True)),
            progress=progress,
            **opts,
        )
    if how.note:  # what the plan decided, beside what fusing did
        report["fusion"] = f"{report['fusion']}; {how.note}" if report.get("fusion") else how.note
        write_report(file, report)
    return report


def write_side_files(ckpt: Checkpoint, folder: Path) -> list[str]:
    """config.json, generation_config.json and the tokenizer / processor files beside model.onnx."""
    model = ckpt.model
    config = model.config
    config.save_pretrained(str(folder))
    gen = getattr(model, "generation_config", None)
    if ckpt.family.causal and gen is not None:
        gen.save_pretrained(str(folder))
    if ckpt.source is not None and Path(ckpt.source).is_dir():
        copy_side_files(Path(ckpt.source), folder)
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _export(
    ckpt: Checkpoint,
    file: Path,
    *,
    kind: str,
    how: Plan,
    dtype: str,
    weights: str | None,
    block_size: int,
    opset: int,
    atol: float | None,
    rtol: float | None,
    batch: int,
    seq_len: int,
    data: DataSpec | None,
    new_tokens: int,
    external: bool | None,
    plain: bool,
    latency: bool,
    progress: Callable[[str, int, int], None] | None,
) -> dict[str, Any]:
    rule = validation_rule(ckpt.manifest)
    if dtype == "fp16" and rule is not None:
        raise SqueezeError("--dtype fp16 applies to float checkpoints; this one is quantized")
    atol = atol if atol is not None else (FP16_ATOL if dtype == "fp16" else DEFAULT_ATOL)
    rtol = rtol if rtol is not None else (FP16_RTOL if dtype == "fp16" else DEFAULT_RTOL)
    if not (0 < atol < 1e3) or not (0 <= rtol < 1e3):
        raise SqueezeError(f"tolerances must be positive and sane (atol={atol}, rtol={rtol})")
    model = ckpt.model.eval()
    registry = None
    if weights is not None:
        from squeeze.compress.export_nbits import float_twin
        from squeeze.compress.passes.quantize.modules import QuantLinear

        model, registry = float_twin(model, ckpt.family, bits=int(weights[3:]), block_size=block_size)
        if any(isinstance(m, QuantLinear) for m in model.modules()):
            raise SqueezeError(
                f"--weights {weights} takes a float checkpoint, or one quantized weight-only "
                f"(--activations none) by squeeze at <= {weights[3:]} bits"
            )
        rule = None  # the graph computes exactly the twin's dequantized weights
    report = report_head(file, ckpt, task=kind, dtype=dtype, weights=weights or "float", opset=opset)
    report.update(exporter="torchscript", atol=atol, rtol=rtol, rule=rule or {"atol": atol, "rtol": rtol})
    stages = ["tracing the model", "finishing the graph", "validating with ONNX Runtime", "done"]
    tell = progress or (lambda label, done, total: None)

    def stage(what: str) -> None:
        tell(f"export: {what}", stages.index(what), len(stages) - 1)

    file.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{file.stem}-", dir=file.parent))
    tmp = tmpdir / file.name
    start = time.perf_counter()
    try:
        stage("tracing the model")
        with eager_attention(model, how.on) as kept:  # traced and validated with the same attention
            inputs = _validation_batches(ckpt, batch, seq_len, data)
            graph = trace(ckpt, model, tmp, kind, inputs, opset=min(opset, TORCHSCRIPT_MAX_OPSET), plain=plain)
            stage("finishing the graph")
            if how.on:  # fuse first, quantize after fusion
                onnx.save(graph.proto, str(tmp))
                fused, report["fused"], line = fuse_file(
                    tmp, ckpt.family, ckpt.model.config, attention=how.attention, keep_gather=registry is not None
                )
                report["fusion"] = f"{line}; {kept}" if kept else line
                graph.proto = fused if fused is not None else graph.proto
            proto = finish(graph.proto, report, registry, dtype, opset)
            for f in tmpdir.iterdir():
                f.unlink()
            files = save(proto, tmp, external=external)
            report["export_seconds"] = round(time.perf_counter() - start, 3)
            report["bytes"] = sum(f.stat().st_size for f in files)
            report["files"] = [f.name for f in files]
            report["custom_ops"] = custom_ops(proto)
            stage("validating with ONNX Runtime")
            reference = reference_model(model, dtype)
            prompt = (seq_len, data, new_tokens)  # the generation check's prompts and length
            validate(ckpt, reference, graph, tmp, inputs, report, judge(atol, rtol, rule), dtype, latency, prompt)
        if report["ok"]:
            for f in files:
                os.replace(f, file.parent / f.name)
            file.with_name(file.stem + ".rejected.onnx").unlink(missing_ok=True)
        else:
            rejected = file.with_name(file.stem + ".rejected.onnx")
            save(proto, rejected, external=len(files) > 1)
            report["rejected_model"] = rejected.name
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    write_report(file, report)
    stage("done")
    if not report["ok"]:
        raise ValidationFailed(failure(report, file))
    return report
