"""What every squeeze export shares after the graph is written: comparing ONNX Runtime with
PyTorch, the failure line, and the report beside the model.

* :func:`compare`: elementwise agreement of one output (``|ort - torch| <= atol + rtol * |torch|``),
  failing on non-finite values on either side.
* :func:`judge`: ``compare``, then, for a quantized model, the rule its passes ask for (cosine and
  relative max error against the fake-quantized twin: one rounding flip cascades elementwise).
* :func:`run_checks`: the graph against a PyTorch module on each validation batch.
* :func:`failure`: the one line a rejected export raises; :func:`write_report`: the JSON report,
  written atomically (``<model>.report.json``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from squeeze.compress.calibration import Batch
from squeeze.compress.passes.base import ExportRule
from squeeze.compress.paths import temp_name

Judge = Callable[[np.ndarray, np.ndarray, str], dict[str, Any]]


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


def judge(atol: float, rtol: float, rule: dict[str, float] | None) -> Judge:
    """``compare`` with these tolerances; a quantized graph (``rule``) is judged by its rule, stats kept."""
    own = ExportRule(**rule) if rule is not None else None

    def run(got: np.ndarray, want: np.ndarray, name: str) -> dict[str, Any]:
        res = compare(name, got, want, atol, rtol)
        if own is not None and "error" not in res:
            verdict = own.check(got, want)
            res.update(ok=verdict["ok"], max_abs_ratio=verdict["max_abs_ratio"], rule=rule)
        return res

    return run


def run_checks(
    session, module: torch.nn.Module, inputs: list[Batch], names: list[str], output: str, check: Judge
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """The graph (fed only the inputs it declares: the exporter drops unread ones, e.g. the
    attention mask once every attention layer is pruned) against ``module`` on every batch.
    Returns the checks and the graph's outputs."""
    graph_inputs = [i.name for i in session.get_inputs()]
    checks, outs = [], []
    for inp in inputs:
        got = session.run(None, {n: inp[n].numpy() for n in graph_inputs})[0]
        outs.append(got)
        with torch.no_grad():
            want = module(*(inp[n] for n in names)).float().numpy()
        shape = "x".join(str(d) for d in inp[names[0]].shape)
        checks.append({**check(got.astype(np.float32), want, output), "shape": shape})
    return checks, outs


def custom_ops(proto: onnx.ModelProto) -> list[str]:
    """``domain::op`` of every node outside the standard domain."""
    return sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})


def failure(report: dict[str, Any], file: Path) -> str:
    """The one line a rejected export raises (:class:`ValidationFailed`)."""
    where = f"(report: {file}.report.json)"
    gen = report.get("generation")
    if all(c["ok"] for c in report["validation"]) and gen is not None and not gen["tokens_equal"]:
        return (
            f"validation failed: greedy tokens differ from transformers' generate at step "
            f"{gen['first_mismatch_step']} of {gen['new_tokens']} {where}"
        )
    bad = next(c for c in report["validation"] + (gen or {}).get("checks", []) if not c["ok"])
    if "error" in bad:
        detail = bad["error"]
    elif "rule" in bad:
        detail = (
            f"cosine {bad['cosine']:.5f} (needs >= {bad['rule']['min_cosine']}), max abs / max |twin| "
            f"{bad['max_abs_ratio']:.3g} (needs <= {bad['rule']['max_abs_ratio']})"
        )
    else:
        detail = (
            f"max abs {bad['max_abs']:.3g}, max rel {bad['max_rel']:.3g}, {bad['mismatched']}/{bad['elements']} "
            f"elements beyond atol={report['atol']:g} rtol={report['rtol']:g}"
        )
    return f"validation failed: output '{bad['output']}': {detail} at shape {bad['shape']} {where}"


def report_head(model: Path, ckpt: Any, **fields: Any) -> dict[str, Any]:
    """The report's first fields: the graph's name (paths in the report are relative to it, as
    the graph lies beside it: no temp or host paths), the checkpoint, the family, then ``fields``."""
    return {
        "model": model.name,
        "checkpoint": str(ckpt.source) if ckpt.source else None,
        "family": ckpt.family.name,
        **fields,
    }


def write_report(model: Path, report: dict[str, Any]) -> Path:
    """``<model>.report.json``, replaced atomically (a killed export never leaves half a report)."""
    path = model.with_name(model.name + ".report.json")
    tmp = temp_name(path)
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return path
