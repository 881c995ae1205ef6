"""``reparam`` (SLAB's progressive LayerNorm -> RepBN, folded) on a tiny ViT and on all-MiniLM-L6-v2.

    .venv/bin/python benchmarks/bench_reparam.py [--part vit|minilm|all]

1. ViT on sklearn's 8x8 digits (the tiny ViT of bench_merge.py, trained here with LayerNorm): test
   accuracy of the original; of RepBN trained progressively (``squeeze reparam --no-fold``:
   distilled against the original for STEPS optimizer steps, gamma 1 -> 0 over the first half);
   of RepBN swapped in directly (``--decay 0``: gamma = 0 from the first step, the paper's
   ablation); and after the fold (``squeeze reparam``, same seed: the same training, then every
   RepBN folded into its neighbours). ONNX Runtime latency of the folded graph against the
   LayerNorm graph, batch 1 and 8.
2. all-MiniLM-L6-v2 (post-LN BERT): cosine mean / worst of the mean-pooled embedding against the
   original on the held-apart built-in sentences after reparam + fold, and the ORT latency ratio
   (batch 1 and 8, sequence 128).

Writes benchmarks/results/reparam.json and reparam.md (each part updates its own entry).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import MINILM, RESULTS, THREADS, ck, export_fp32, latencies, write_results
from digits_vit import VIT, accuracy, digits, logits_of, pixels, save_expert, train

from squeeze.cli.main import main as squeeze_main
from squeeze.compress.evaluate import ort_latency_ms, ort_session

VIT_STEPS = 600
VIT_LR = 1e-3
MINILM_STEPS = 160
MINILM_LR = 1e-4
LATENCY_BATCHES = (1, 8)


def reparam(src: Path | str, out: Path, *args: str) -> dict:
    """Run ``squeeze reparam`` and return its ledger row."""
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = squeeze_main(["reparam", str(src), "-o", str(out), "--force", "--json", *args])
    assert code == 0, f"squeeze reparam failed ({code})"
    return json.loads(printed.getvalue())["report"]


def vit_latency(paths: dict[str, Path], x: np.ndarray, rounds: int = 5) -> dict[str, dict[int, float]]:
    sessions = {k: ort_session(p, threads=THREADS) for k, p in paths.items()}
    res: dict[str, dict[int, list[float]]] = {k: {b: [] for b in LATENCY_BATCHES} for k in paths}
    for b in LATENCY_BATCHES:
        feeds = {"pixel_values": pixels(x[:b]).numpy()}
        for _ in range(rounds):
            for k, s in sessions.items():
                res[k][b].append(ort_latency_ms(s, feeds, warmup=5, runs=50))
    return {k: {b: float(np.median(v)) for b, v in d.items()} for k, d in res.items()}


def norm_ops(path: Path) -> dict[str, int]:
    import onnx

    ops: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        if node.op_type in ("LayerNormalization", "ReduceMean", "BatchNormalization", "Mul", "Add", "Sqrt", "Div"):
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def part_vit(tmp: Path) -> tuple[dict, list[str]]:
    xtr, xte, ytr, yte = digits()
    t0 = time.perf_counter()
    original = train(xtr, ytr, seed=0)
    train_s = time.perf_counter() - t0
    orig_dir = save_expert(original, tmp / "vit")
    np.savez(tmp / "train.npz", pixel_values=xtr, labels=ytr)
    data = [
        "--data",
        str(tmp / "train.npz"),
        "--samples",
        str(len(xtr)),
        "--steps",
        str(VIT_STEPS),
        "--lr",
        str(VIT_LR),
    ]
    runs = {
        "progressive RepBN": (tmp / "prog", [*data, "--no-fold"]),
        "direct RepBN (no schedule)": (tmp / "direct", [*data, "--no-fold", "--decay", "0"]),
        "progressive RepBN, folded": (tmp / "folded", data),
        "progressive RepBN + SLA, folded": (tmp / "sla", [*data, "--attention", "sla"]),
    }
    ref = logits_of(original, xte)
    acc = {"LayerNorm (original)": accuracy(ref, yte)}
    agree = {"LayerNorm (original)": 1.0}
    ledger = {}
    for name, (out, args) in runs.items():
        ledger[name] = reparam(orig_dir, out, *args)
        logits = logits_of(ck.load(out).model, xte)
        acc[name] = accuracy(logits, yte)
        agree[name] = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
        print(f"{name}: test accuracy {acc[name]:.3f} ({ledger[name]['seconds']:.0f} s)", file=sys.stderr)
    prog, folded = ck.load(tmp / "prog").model, ck.load(tmp / "folded").model
    fold_err = float((logits_of(prog, xte) - logits_of(folded, xte)).abs().max())
    paths = {"LayerNorm": tmp / "ln.onnx", "RepBN folded": tmp / "folded.onnx", "RepBN folded + SLA": tmp / "sla.onnx"}
    export_fp32(ck.load(orig_dir), paths["LayerNorm"])
    export_fp32(ck.load(tmp / "folded"), paths["RepBN folded"])
    export_fp32(ck.load(tmp / "sla"), paths["RepBN folded + SLA"])
    lat = vit_latency(paths, xte)
    ops = {k: norm_ops(p) for k, p in paths.items()}
    md = [
        f"### ViT on load_digits ({len(xtr)} train / {len(xte)} test images; hidden {VIT['hidden_size']}, "
        f"{VIT['num_hidden_layers']} layers; original trained {train_s:.0f} s)",
        "",
        f"reparam: {VIT_STEPS} optimizer steps (batch 16, lr {VIT_LR}), distilled against the LayerNorm original "
        "(logits + per-layer outputs; no labels); progressive = gamma 1 -> 0 over the first half; every RepBN "
        "starts as the least-squares fit of its LayerNorm.",
        "",
        "| model | test accuracy | top-1 agreement with the original (test) |",
        "|---|---|---|",
    ]
    for name, a in acc.items():
        md.append(f"| {name} | {a:.3f} | {agree[name]:.3f} |")
    md += [
        "",
        f"Fold exactness on the test split: max |logit(progressive RepBN) - logit(folded)| = {fold_err:.2g}.",
        "",
        f"ONNX Runtime CPU, {THREADS} threads, median of 5 interleaved rounds x 50 runs:",
        "",
        "| graph | norm-related ops | batch 1 | batch 8 | ratio b1 | ratio b8 |",
        "|---|---|---|---|---|---|",
    ]
    base = lat["LayerNorm"]
    for k, v in lat.items():
        md.append(f"| {k} | {ops[k]} | {v[1]:.3f} ms | {v[8]:.3f} ms | {v[1] / base[1]:.2f}x | {v[8] / base[8]:.2f}x |")
    data_out = {
        "accuracy": acc,
        "agreement": agree,
        "fidelity": {k: v["fidelity"] for k, v in ledger.items()},
        "reparam_seconds": {k: v["seconds"] for k, v in ledger.items()},
        "fold_max_abs_logit_error": fold_err,
        "latency_ms": lat,
        "onnx_ops": ops,
        "config": {"vit": VIT, "steps": VIT_STEPS, "lr": VIT_LR},
    }
    return data_out, md


def part_minilm(tmp: Path) -> tuple[dict, list[str]]:
    out = tmp / "minilm"
    t0 = time.perf_counter()
    row = reparam(MINILM, out, "--steps", str(MINILM_STEPS), "--lr", str(MINILM_LR))
    seconds = time.perf_counter() - t0
    paths = {"LayerNorm (fp32)": tmp / "minilm.onnx", "RepBN folded": tmp / "minilm-folded.onnx"}
    base_ck = ck.load(MINILM)
    export_fp32(base_ck, paths["LayerNorm (fp32)"])
    export_fp32(ck.load(out), paths["RepBN folded"])
    lat = latencies(paths, base_ck)
    ops = {k: norm_ops(p) for k, p in paths.items()}
    fid = row["fidelity"]
    md = [
        "### all-MiniLM-L6-v2 (post-LN BERT)",
        "",
        f"`squeeze reparam {MINILM} --steps {MINILM_STEPS}` (batches of 16 Wikipedia sentences, distill's "
        f"training text; lr {MINILM_LR}; least-squares RepBN start; {seconds:.0f} s): 12 LayerNorms -> RepBN, "
        "folded through the residual writers (11 removed, the last one left as a per-channel scale).",
        "",
        f"Cosine of the mean-pooled embedding vs the original on {fid.get('samples')} held-apart sentences: "
        f"mean {fid['cos_mean']:.4f}, worst {fid['cos_worst']:.4f}.",
        "",
        "| graph | norm-related ops | batch 1 | batch 8 | ratio b1 | ratio b8 |",
        "|---|---|---|---|---|---|",
    ]
    base = lat["LayerNorm (fp32)"]
    for k, v in lat.items():
        md.append(f"| {k} | {ops[k]} | {v[1]:.3f} ms | {v[8]:.3f} ms | {v[1] / base[1]:.2f}x | {v[8] / base[8]:.2f}x |")
    data_out = {
        "fidelity": fid,
        "seconds": round(seconds, 1),
        "latency_ms": lat,
        "onnx_ops": ops,
        "config": {"steps": MINILM_STEPS, "lr": MINILM_LR},
    }
    return data_out, md


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("vit", "minilm", "all"), default="all")
    args = ap.parse_args()
    torch.set_num_threads(1)
    prev_path = RESULTS / "reparam.json"
    prev = json.loads(prev_path.read_text()) if prev_path.exists() else {}
    results = {k: prev[k] for k in ("vit", "minilm") if k in prev}
    md_parts = dict(prev.get("markdown", {}))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        for part, fn in (("vit", part_vit), ("minilm", part_minilm)):
            if args.part in (part, "all"):
                results[part], md = fn(tmp)
                md_parts[part] = "\n".join(
                    [
                        *md,
                        "",
                        f"Command: `.venv/bin/python benchmarks/bench_reparam.py --part {part}` "
                        f"({time.perf_counter() - start:.0f} s).",
                    ]
                )
    write_results(
        "reparam",
        {**results, "markdown": md_parts},
        "\n\n".join(md_parts[k] for k in ("vit", "minilm") if k in md_parts),
    )


if __name__ == "__main__":
    main()
