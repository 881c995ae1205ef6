"""What ONNX Runtime really runs for a quantized graph, and how to validate one against its twin.

``integer_kernels(path)`` builds an ORT session with the optimized graph written to disk and
counts its node types: a quantized squeeze export must show ORT's integer kernels
(``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat`` for dynamic activations,
``QLinearMatMul`` / ``MatMulIntegerToFloat`` after a ``QuantizeLinear`` for static QDQ), not
float MatMuls fed by dequantized weights.

``validation_rule(manifest)``: elementwise tolerances do not suit a quantized graph. The PyTorch
twin and ORT agree bit for bit on the integer arithmetic (``squeeze kernels --validate``), but
the float ops between them (LayerNorm, GELU, softmax) differ in the last ulp; an ulp moves a
value across a rounding boundary now and then, one code flips, and the flip perturbs every later
layer by about one quantization step, which flips more codes. On all-MiniLM-L6-v2 int8 dynamic,
half the single-sentence inputs agree to 1e-6 and the other half show a cascade: max abs error
0.02-0.07, cosine 0.9995 (the quantization error itself is ~5x larger: cosine 0.9975 vs fp32).
The rule therefore checks the cosine and a max error relative to the output's magnitude.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path
from typing import Any

INTEGER_KERNELS = (
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QLinearMatMul",
    "MatMulInteger",
    "QGemm",
    "QAttention",
    "MatMulNBits",
)
# min cosine(ORT, twin) per bit width. Measured on MiniLM int8 (export's validation shapes and
# padded eval batches): 0.9952-1.0; a cascade is as large as the quantization error itself
# (ORT then runs an equally valid neighbour of the twin), so the bound sits below it. A wrong
# scale, zero point or layout gives cosines far lower.
MIN_COSINE = {8: 0.99, 7: 0.98, 6: 0.98, 5: 0.95, 4: 0.9}
MAX_ABS_RATIO = 0.25  # max |ORT - twin| / max |twin|; measured 0.15 worst on padded MiniLM batches


def integer_kernels(path: str | Path) -> dict[str, Any]:
    """Node types of ORT's optimized graph (CPU, all optimizations) and its integer kernels."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(opt)
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        counts = collections.Counter(n.op_type for n in onnx.load(str(opt), load_external_data=False).graph.node)
    integer = {k: v for k, v in counts.items() if k in INTEGER_KERNELS}
    return {
        "integer_kernels": integer,
        "float_matmuls": counts.get("MatMul", 0) + counts.get("FusedMatMul", 0),
        "op_counts": dict(sorted(counts.items())),
    }


def validation_rule(manifest) -> dict[str, float] | None:
    """For a quantized checkpoint: {"min_cosine", "max_abs_ratio"} (``QuantizePass.export_rule``);
    None for a float one."""
    from squeeze.compress.passes import export_rule

    rule = export_rule(getattr(manifest, "edits", []) or [])
    return rule.model_dump() if rule is not None else None


def rule_for(w_bits: int, activations: str, a_bits: int) -> dict[str, float]:
    """The validation rule of a graph quantized to these widths (see the module docstring)."""
    if activations == "none":  # weight-only: float compute on dequantized weights, no code flips
        return {"min_cosine": 0.9999, "max_abs_ratio": 1e-3}
    return {"min_cosine": MIN_COSINE.get(min(a_bits, w_bits, 8), 0.9), "max_abs_ratio": MAX_ABS_RATIO}


def check(ort_out, twin_out, rule: dict[str, float]) -> dict[str, Any]:
    """Apply a :func:`validation_rule` to one output pair (numpy arrays)."""
    from squeeze.compress.passes.base import ExportRule

    return ExportRule(**rule).check(ort_out, twin_out)
