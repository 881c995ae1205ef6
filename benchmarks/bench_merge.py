"""Logit-averaging merge (Growing Transformers) on real data: sklearn's 8x8 digits.

Two tiny ViTs are trained on disjoint halves of the training split, a third on all of it; the
two experts are merged with ``squeeze merge`` (equal weights) and every model is scored on the
held-out test split. Two ways of halving: random halves (same label distribution) and by
class (digits 0-4 vs 5-9: each expert never sees half the classes). A probability-averaging
ensemble is shown beside the logit average for comparison (not what squeeze builds). Then the
merged ONNX graph (one graph, both experts) is timed against one expert's graph with ONNX
Runtime, side by side in this process.

Shared frozen embedding (the Growing Transformers premise: experts grown on one frozen, untrained
substrate): the same halves again, with both experts' embedding layer (patch projection, [CLS],
positions) taken from one randomly initialised ViT and frozen during training; only the blocks
and the head are the experts' own.

    .venv/bin/python benchmarks/bench_merge.py

Writes benchmarks/results/merge.json and merge.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import THREADS, ck, export_onnx, write_results
from digits_vit import BATCH, EPOCHS, LR, VIT, accuracy, digits, logits_of, pixels, save_expert, train

from squeeze.cli.main import main as squeeze_main
from squeeze.compress.evaluate import ort_latency_ms, ort_session

SEEDS = (0, 1, 2)
LATENCY_BATCHES = (1, 8)
LATENCY_ROUNDS = 5


SHARED = ", shared frozen embedding"
SPLITS = ("random halves", "by class", "random halves" + SHARED, "by class" + SHARED)


def substrate(seed: int) -> dict:
    """The embedding layer of a freshly initialised digits ViT (never trained)."""
    import transformers as T

    torch.manual_seed(1000 + seed)
    return T.ViTForImageClassification(T.ViTConfig(**VIT)).vit.embeddings.state_dict()


def run_split(kind: str, xtr, ytr, xte, yte, seed: int, tmp: Path, full, frozen: dict | None = None) -> dict:
    rng = np.random.default_rng(seed)
    if kind.startswith("random halves"):
        perm = rng.permutation(len(xtr))
        halves = [perm[: len(perm) // 2], perm[len(perm) // 2 :]]
    else:
        halves = [np.flatnonzero(ytr < 5), np.flatnonzero(ytr >= 5)]
    folders = []
    for i, idx in enumerate(halves):
        expert = train(xtr[idx], ytr[idx], seed * 10 + i, frozen_embeddings=frozen)
        folders.append(save_expert(expert, tmp / f"{kind[:6]}{'-shared' * (frozen is not None)}-{seed}-{i}"))
    out = tmp / f"merged-{kind[:6]}{'-shared' * (frozen is not None)}-{seed}"
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # the ledger row, as JSON
        code = squeeze_main(
            ["merge", str(folders[0]), str(folders[1]), "-o", str(out), "--data", str(tmp / "test.npz"), "--json"]
        )
    merge_s = time.perf_counter() - t
    assert code == 0, f"squeeze merge failed ({code})"
    ledger = json.loads(printed.getvalue())
    merged = ck.load(out).model
    a, b = (ck.load(f).model for f in folders)
    la, lb, lm = logits_of(a, xte), logits_of(b, xte), logits_of(merged, xte)
    assert torch.allclose(lm, (la + lb) / 2, atol=1e-6)  # the merge is the mean of the experts' logits
    prob = (la.softmax(-1) + lb.softmax(-1)) / 2
    return {
        "split": kind,
        "seed": seed,
        "expert_a": accuracy(la, yte),
        "expert_b": accuracy(lb, yte),
        "merge": accuracy(lm, yte),
        "prob_average": accuracy(prob, yte),
        "all_data": accuracy(logits_of(full, xte), yte),
        "merge_seconds": round(merge_s, 2),
        "ledger_fidelity_vs_expert_a": ledger["fidelity"],
        "folders": [str(f) for f in folders],
        "merged": str(out),
    }


def latency(paths: dict[str, Path], xte: np.ndarray) -> dict[str, dict[int, float]]:
    """Median ORT latency (ms) per graph and batch size, graphs interleaved in rounds."""
    sessions = {k: ort_session(p, threads=THREADS) for k, p in paths.items()}
    res: dict[str, dict[int, list[float]]] = {k: {b: [] for b in LATENCY_BATCHES} for k in paths}
    for b in LATENCY_BATCHES:
        feeds = {"pixel_values": pixels(xte[:b]).numpy()}
        for _ in range(LATENCY_ROUNDS):
            for k, s in sessions.items():
                res[k][b].append(ort_latency_ms(s, feeds, warmup=5, runs=50))
    return {k: {b: float(np.median(v)) for b, v in d.items()} for k, d in res.items()}


def main() -> None:
    torch.set_num_threads(1)  # training tiny models: one thread is ~10x faster here than two on a busy machine
    start = time.perf_counter()
    xtr, xte, ytr, yte = digits()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        np.savez(tmp / "test.npz", pixel_values=xte, labels=yte)
        for seed in SEEDS:
            full = train(xtr, ytr, seed * 10 + 9)
            params = sum(p.numel() for p in full.parameters())
            for kind in SPLITS:
                frozen = substrate(seed) if kind.endswith(SHARED) else None
                rows.append(run_split(kind, xtr, ytr, xte, yte, seed, tmp, full, frozen))
                r = rows[-1]
                print(
                    f"{kind:14s} seed {seed}: A {r['expert_a']:.3f}  B {r['expert_b']:.3f}  merge {r['merge']:.3f}  "
                    f"prob-avg {r['prob_average']:.3f}  all-data {r['all_data']:.3f}",
                    file=sys.stderr,
                )
        # ONNX: the merged graph (both experts and the average) against one expert's graph.
        first = rows[0]
        onnx_paths = {"one expert": tmp / "expert.onnx", "merged (2 experts)": tmp / "merged.onnx"}
        rep_e = export_onnx(ck.load(first["folders"][0]), onnx_paths["one expert"], latency=False)
        rep_m = export_onnx(ck.load(first["merged"]), onnx_paths["merged (2 experts)"], latency=False)
        lat = latency(onnx_paths, xte)
        sizes = {k: p.stat().st_size for k, p in onnx_paths.items()}
        ort_acc = accuracy(
            torch.from_numpy(
                ort_session(onnx_paths["merged (2 experts)"]).run(None, {"pixel_values": pixels(xte).numpy()})[0]
            ),
            yte,
        )
    for r in rows:
        r.pop("folders"), r.pop("merged")

    def mean_std(split: str, key: str) -> tuple[float, float]:
        v = np.array([r[key] for r in rows if r["split"] == split])
        return float(v.mean()), float(v.std())

    summary = {
        s: {k: mean_std(s, k) for k in ("expert_a", "expert_b", "merge", "prob_average", "all_data")} for s in SPLITS
    }
    n_train, n_test = len(xtr), len(xte)
    md = [
        f"Digits (sklearn `load_digits`, 8x8): {n_train} training / {n_test} test images. Tiny ViT "
        f"(patch 2, hidden {VIT['hidden_size']}, {VIT['num_hidden_layers']} layers, "
        f"{params:,} parameters; {EPOCHS} epochs, AdamW); each expert trains on half the training split, the all-data model on all "
        f"of it (same epochs). Test accuracy, mean ± std over seeds {list(SEEDS)}.",
        "",
        "| halves | expert A | expert B | **merge (logit mean)** | prob. average | all-data model |",
        "|---|---|---|---|---|---|",
    ]
    for s, d in summary.items():
        md.append(
            f"| {s} | "
            + " | ".join(
                f"{d[k][0]:.3f} ± {d[k][1]:.3f}" for k in ("expert_a", "expert_b", "merge", "prob_average", "all_data")
            )
            + " |"
        )
    md += [
        "",
        f"ONNX Runtime CPU, {THREADS} threads, median latency (5 interleaved rounds x 50 runs); merged graph from "
        f"seed {SEEDS[0]}, random halves. The merged graph's ORT accuracy on the test split: {ort_acc:.3f}; "
        f"validation max abs error vs PyTorch {max(c['max_abs'] for c in rep_m['validation']):.2g}.",
        "",
        "| graph | size | batch 1 | batch 8 | ratio b1 | ratio b8 |",
        "|---|---|---|---|---|---|",
    ]
    base = lat["one expert"]
    for k, v in lat.items():
        md.append(
            f"| {k} | {sizes[k] / 1024:.0f} KB | {v[1]:.3f} ms | {v[8]:.3f} ms | "
            f"{v[1] / base[1]:.2f}x | {v[8] / base[8]:.2f}x |"
        )
    md += ["", f"Command: `.venv/bin/python benchmarks/bench_merge.py` ({time.perf_counter() - start:.0f} s)."]
    write_results(
        "merge",
        {
            "config": {
                "vit": VIT,
                "epochs": EPOCHS,
                "batch": BATCH,
                "lr": LR,
                "seeds": list(SEEDS),
                "train": n_train,
                "test": n_test,
            },
            "rows": rows,
            "summary": summary,
            "latency_ms": lat,
            "onnx_bytes": sizes,
            "merged_onnx_accuracy": ort_acc,
            "export_validation": {"expert": rep_e["validation"], "merged": rep_m["validation"]},
        },
        "\n".join(md),
    )


if __name__ == "__main__":
    main()
