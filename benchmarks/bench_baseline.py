"""The baselines every squeeze row is compared with, on the real all-MiniLM-L6-v2:
the fp32 ONNX export and ONNX Runtime's quantize_dynamic (per-channel int8).

    .venv/bin/python benchmarks/bench_baseline.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import (
    MINILM,
    SEQ,
    ck,
    eval_batches,
    export_fp32,
    latencies,
    onnx_fidelity,
    ort_dynamic,
    reference_outputs,
    write_results,
)


def main() -> None:
    ckpt = ck.load(MINILM)
    ref = reference_outputs(ckpt.model, ckpt.family, eval_batches(ckpt))
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_fp32(ckpt, Path(tmp) / "fp32.onnx")
        dyn = ort_dynamic(fp32, Path(tmp) / "ort_dynamic.onnx")
        paths = {"fp32 export": fp32, "ORT quantize_dynamic": dyn}
        lat = latencies(paths, ckpt)
        rows = {}
        for name, path in paths.items():
            fid = onnx_fidelity(path, ref)
            rows[name] = {
                "bytes": path.stat().st_size,
                "cos_mean": fid["cos_mean"],
                "cos_worst": fid["cos_worst"],
                "latency_ms": lat[name],
            }
    base = rows["fp32 export"]
    md = [
        f"all-MiniLM-L6-v2, ONNX Runtime CPU, {2} threads, sequence {SEQ}, median latency; cosine of the "
        f"mean-pooled embedding vs PyTorch fp32 on {ref.batches and sum(len(b['input_ids']) for b in ref.batches)} held-out sentences",
        "",
        "| model | size | cos mean | cos worst | latency b1 | latency b8 | speed-up b1 | speed-up b8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        md.append(
            f"| {name} | {r['bytes'] / 2**20:.1f} MB | {r['cos_mean']:.4f} | {r['cos_worst']:.4f} | "
            f"{r['latency_ms'][1]:.2f} ms | {r['latency_ms'][8]:.2f} ms | "
            f"{base['latency_ms'][1] / r['latency_ms'][1]:.2f}x | {base['latency_ms'][8] / r['latency_ms'][8]:.2f}x |"
        )
    write_results("baseline", {"rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
