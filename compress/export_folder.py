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

A plain fp32 encoder export goes through ``export_onnx`` unchanged.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from squeeze.compress.calibration import DataSpec
from squeeze.compress.checkpoint import Checkpoint, copy_side_files
from squeeze.compress.errors import SqueezeError, ValidationFailed
from squeeze.compress.evaluate import model_outputs, ort_latency_ms, ort_session
from squeeze.compress.export import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    ExportWrapper,
    _torch_export,
    _validation_batches,
    compare,
    export_onnx,
    input_names,
)
from squeeze.compress.export_decoder import (
    NEW_TOKENS,
    WITH_PAST,
    export_with_past,
    prefill_checks,
    prompts,
    resolve_task,
    validate_generation,
)
from squeeze.compress.export_graph import FUSABLE, fuse, save, share_tied_weights, to_fp16
from squeeze.compress.passes.quantize.onnx_check import check as quant_check
from squeeze.compress.passes.quantize.onnx_check import validation_rule
from squeeze.compress.paths import check_output

DTYPES = ("fp32", "fp16")
WEIGHTS = ("int4", "int8")
# fp16 graph vs the fp16 PyTorch model: tiny BERT measured max abs 5.9e-3 on outputs up to 3.4,
# tiny gpt2 2.7e-4, tiny llama 4.0e-4 (fp16 rounding differs between the two runtimes)
FP16_ATOL = 2e-2
FP16_RTOL = 1e-2
TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter's last opset; higher ones are converted after
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
    optimize: bool = False,
    **legacy: Any,
) -> dict[str, Any]:
    """Export ``ckpt`` to ``out`` (a ``.onnx`` file, or an Optimum-style folder); return the report.

    ``legacy`` takes ``export_onnx``'s other options (target, exporter, plain, reference, latency).
    """
    out = Path(out)
    _check(dtype, weights, block_size, opset, new_tokens, batch, seq_len, ckpt)
    kind = resolve_task(task, ckpt)
    folder = None if out.suffix == ".onnx" else out
    sources = [ckpt.source, getattr(legacy.get("reference"), "source", None)]
    if folder is not None:  # an existing folder needs --force; its model.onnx is then replaced
        folder = check_output(folder, sources, force=force, kind="dir")
        force = True
    file = out if folder is None else folder / "model.onnx"
    if optimize and (kind != "default" or ckpt.family.name not in FUSABLE or ckpt.family.causal):
        raise SqueezeError(f"--optimize fuses encoder graphs ({', '.join(FUSABLE)}); not {ckpt.family.name} ({kind})")
    plain_path = (
        kind == "default" and dtype == "fp32" and weights is None and opset <= TORCHSCRIPT_MAX_OPSET and not optimize
    )
    if plain_path:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        report = export_onnx(
            ckpt,
            file,
            opset=opset,
            atol=atol or DEFAULT_ATOL,
            rtol=rtol or DEFAULT_RTOL,
            batch=batch,
            seq_len=seq_len,
            force=force,
            data=data,
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
            dtype=dtype,
            weights=weights,
            block_size=block_size,
            opset=opset,
            atol=atol,
            rtol=rtol,
            batch=batch,
            seq_len=seq_len,
            data=data,
            new_tokens=new_tokens,
            external=external,
            optimize=optimize,
            plain=bool(legacy.get("plain", False)),
            latency=bool(legacy.get("latency", True)),
        )
    if folder is not None:
        report["folder"] = write_side_files(ckpt, folder)
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


def _reference_model(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    return copy.deepcopy(model).half().eval() if dtype == "fp16" else model


def _export(
    ckpt: Checkpoint,
    file: Path,
    *,
    kind: str,
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
    optimize: bool,
    plain: bool,
    latency: bool,
) -> dict[str, Any]:
    from squeeze.kernels.registry import finalize_onnx

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
    if optimize:  # the optimizer matches eager attention's pattern, not the fused SDPA call
        model = copy.deepcopy(model) if model is ckpt.model else model
        model.set_attn_implementation("eager")
    reference = _reference_model(model, dtype)

    def judge(got: np.ndarray, want: np.ndarray, name: str) -> dict[str, Any]:
        res = compare(name, got, want, atol, rtol)
        if rule is not None and "error" not in res:
            verdict = quant_check(got, want, rule)
            res.update(ok=verdict["ok"], max_abs_ratio=verdict["max_abs_ratio"], rule=rule)
        return res

    report: dict[str, Any] = {
        "model": file.name,
        "checkpoint": str(ckpt.source) if ckpt.source else None,
        "family": ckpt.family.name,
        "task": kind,
        "dtype": dtype,
        "weights": weights or "float",
        "opset": opset,
        "exporter": "torchscript",
        "atol": atol,
        "rtol": rtol,
        "rule": rule or {"atol": atol, "rtol": rtol},
    }
    file.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{file.stem}-", dir=file.parent))
    tmp = tmpdir / file.name
    start = time.perf_counter()
    try:
        trace_opset = min(opset, TORCHSCRIPT_MAX_OPSET)
        inputs = _validation_batches(ckpt, batch, seq_len, data)
        if kind == WITH_PAST:
            layout = export_with_past(model, tmp, opset=trace_opset)
        else:
            names = input_names(ckpt)
            output = next(iter(model_outputs(model, ckpt.family, inputs[0])))
            wrapper = ExportWrapper(model, names, output, ckpt.family.causal).eval()
            _torch_export(
                wrapper,
                tuple(inputs[0][n] for n in names),
                names,
                output,
                tmp,
                opset=trace_opset,
                exporter="torchscript",
                vision=ckpt.family.modality == "vision",
            )
        proto = finalize_onnx(onnx.load(str(tmp)), plain=plain)
        if optimize:  # fuse first, quantize after fusion
            onnx.save(proto, str(tmp))
            cfg = ckpt.model.config
            proto, report["fused"] = fuse(
                tmp,
                ckpt.family.name,
                ckpt.family.num_heads(cfg),
                ckpt.family.hidden_size(cfg),
                keep_gather=registry is not None,
            )
        if registry is not None:
            from squeeze.compress.export_nbits import rewrite

            proto, report["nbits"] = rewrite(proto, registry)
        proto, report["tied_bytes_saved"] = share_tied_weights(proto)
        if dtype == "fp16":
            proto = to_fp16(proto)
        if opset > trace_opset:
            from onnx import version_converter

            proto = version_converter.convert_version(proto, opset)
        for f in tmpdir.iterdir():
            f.unlink()
        files = save(proto, tmp, external=external)
        report["export_seconds"] = round(time.perf_counter() - start, 3)
        report["bytes"] = sum(f.stat().st_size for f in files)
        report["files"] = [f.name for f in files]
        report["custom_ops"] = sorted(
            {f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
        )
        session = ort_session(tmp)
        report["inputs"] = [i.name for i in session.get_inputs()]
        report["outputs"] = [o.name for o in session.get_outputs()]
        np_dtype = np.float16 if dtype == "fp16" else np.float32
        if kind == WITH_PAST:
            checks = prefill_checks(session, reference, inputs, judge)
            ids, mask, pad = prompts(ckpt, seq_len, data)
            gen = validate_generation(
                session, reference, layout, ids, mask, pad, new=new_tokens, dtype=np_dtype, judge=judge
            )
            report.update(validation=checks, generation=gen, ok=gen["ok"] and all(c["ok"] for c in checks))
            report["cache_slots"] = [len(s) for s in layout.slots]
            report["latency_ms"] = gen["ort_ms_per_token"]
        else:
            wrapper = ExportWrapper(reference, names, output, ckpt.family.causal).eval()
            checks = []
            for inp in inputs:
                got = session.run(None, {n: inp[n].numpy() for n in report["inputs"]})[0]
                with torch.no_grad():
                    want = wrapper(*(inp[n] for n in names)).float().numpy()
                shape = "x".join(str(d) for d in inp[names[0]].shape)
                checks.append({**judge(got.astype(np.float32), want, output), "shape": shape})
            report.update(validation=checks, ok=all(c["ok"] for c in checks))
            if latency:
                feeds = {n: inputs[0][n].numpy() for n in report["inputs"]}
                report["latency_ms"] = round(ort_latency_ms(session, feeds, warmup=3, runs=10), 3)
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
    file.with_name(file.name + ".report.json").write_text(json.dumps(report, indent=2) + "\n")
    if not report["ok"]:
        raise ValidationFailed(_failure(report, file))
    return report


def _failure(report: dict[str, Any], file: Path) -> str:
    gen = report.get("generation")
    if all(c["ok"] for c in report["validation"]) and gen is not None and not gen["tokens_equal"]:
        return (
            f"validation failed: greedy tokens differ from transformers' generate at step "
            f"{gen['first_mismatch_step']} of {gen['new_tokens']} (report: {file}.report.json)"
        )
    bad = next(c for c in report["validation"] + (gen or {}).get("checks", []) if not c["ok"])
    detail = bad.get("error") or (
        f"max abs {bad['max_abs']:.3g}, max rel {bad['max_rel']:.3g}, {bad['mismatched']}/"
        f"{bad['elements']} elements beyond atol={report['atol']:g} rtol={report['rtol']:g}"
    )
    return f"validation failed: output '{bad['output']}' ({bad['shape']}): {detail} (report: {file}.report.json)"
