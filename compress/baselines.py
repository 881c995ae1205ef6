"""Reference points for a job's ledger and plot: its original model as an fp32 ONNX graph, and
that graph quantized by ONNX Runtime's own ``quantize_dynamic`` (what a user gets without
squeeze). Latencies are measured with :func:`squeeze.compress.latency.measure` against the fp32
graph, so every latency in a report is a ratio to the same graph, with its spread.

``job_baselines`` writes both graphs into one folder (``OUT/<job>/00-baselines`` in a run), keyed
by the original model's content hash: a rerun reuses them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from squeeze.compress.calibration import DataSpec
from squeeze.compress.checkpoint import Checkpoint, atomic_dir
from squeeze.compress.evaluate import Reference, compare_outputs, ort_session
from squeeze.compress.latency import measure

log = logging.getLogger(__name__)

FP32, DYNAMIC = "fp32.onnx", "ort-dynamic.onnx"
MARK = "baselines.json"  # written last: the folder is complete


def graph_fidelity(path: Path, reference: Reference) -> dict[str, float]:
    """An ONNX graph run by ONNX Runtime on the reference's batches, compared with its outputs."""
    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    output = next(iter(reference.outputs[0]))
    outs = []
    for b in reference.batches:
        feeds = {n: (b[n] if n in b else torch.zeros_like(b["input_ids"])).numpy() for n in names}
        outs.append({output: torch.from_numpy(session.run(None, feeds)[0]).float()})
    return compare_outputs(reference, Reference(family=reference.family, outputs=outs, batches=reference.batches))


def ort_dynamic(fp32: Path, out: Path) -> Path:
    """ONNX Runtime's dynamic int8 quantization of a graph (weights int8, activations at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs "consider pre-processing" advice on the root logger
    try:
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return out


def job_baselines(
    original: Checkpoint,
    reference: Reference,
    folder: Path,
    key: str,
    feeds: dict[str, np.ndarray],
    spec: DataSpec | None = None,
) -> dict[str, dict[str, Any]]:
    """``{"fp32 ONNX": row, "ORT dynamic int8": row}`` for a job; each row holds ``bytes``,
    ``latency_ms``, ``latency_ratio`` / ``ratio_spread`` (vs the fp32 graph) and ``fidelity``."""
    from squeeze.compress.export import export_onnx

    mark = folder / MARK
    try:
        data = json.loads(mark.read_text())
        if data.get("key") == key:
            return data["rows"]
    except (OSError, ValueError):
        pass
    with atomic_dir(folder, force=True) as tmp:
        export_onnx(original, tmp / FP32, data=spec, latency=False, force=True)
        ort_dynamic(tmp / FP32, tmp / DYNAMIC)
    rows: dict[str, dict[str, Any]] = {}
    for name, file in (("fp32 ONNX", FP32), ("ORT dynamic int8", DYNAMIC)):
        path = folder / file
        if file == FP32:  # the reference itself: milliseconds only, ratio 1 by definition
            lat = {**measure(path, feeds), "latency_ratio": 1.0}
        else:
            lat = measure(path, feeds, reference=folder / FP32)
        rows[name] = {"bytes": path.stat().st_size, **lat, "fidelity": graph_fidelity(path, reference)}
    tmp_mark = mark.with_name(f".{MARK}.tmp-{os.getpid()}")
    tmp_mark.write_text(json.dumps({"key": key, "rows": rows}, indent=2) + "\n")
    tmp_mark.replace(mark)
    return rows
