"""``quantize`` against ONNX Runtime's own ``quantize_dynamic``, and a tiny ViT on load_digits.

    .venv/bin/python benchmarks/bench_quantize.py

all-MiniLM-L6-v2 (the real checkpoint):

* baselines: the fp32 export, and ``quantize_dynamic(per_channel=True, QInt8)`` applied to it
  (what ``optimum-cli onnxruntime quantize`` does on CPU);
* squeeze's default int8 (``squeeze quantize`` with no options: repquant, dynamic activations),
  the same with ``--method minmax`` (ORT's method through squeeze's export), and static W8A8
  (repquant, exported; the percentile and block-wise BCT schemes as PyTorch twins), exported
  graphs through ``squeeze export``;
* fidelity of W6A6, W4A4 and W4 weight-only (PyTorch twin; ORT has no kernels below 8 bits).

Fidelity: cosine of the mean-pooled embedding vs PyTorch fp32 on 100 held-apart sentences (mean
/ worst), computed from ONNX Runtime's outputs for the exported graphs and from the PyTorch twin
otherwise. Latency: ORT CPU, 2 threads, batch 1 and 8, sequence 128, median of interleaved
rounds, as a speed-up over fp32. Size: the .onnx file. Integer kernels: node types of ORT's
optimized graph. PyTorch runs single-threaded here: on this shared 2-core machine a 2-thread
pool made MiniLM's forward 5x slower (measured), which only distorts the pass timings.

Tiny ViT (image 8, patch 2, 4 layers, hidden 64; 60 epochs, ~30 s) trained here on sklearn's
load_digits (1,400 train / 397 test images): test accuracy at W8A8, W6A6, W4A4 for repquant,
percentile, minmax (calibration: 256 training images).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import MINILM, ck, eval_batches, export_fp32, latencies, onnx_fidelity, ort_dynamic, write_results

from squeeze.compress.calibration import DataSpec, to_pixel_values
from squeeze.compress.evaluate import compare_outputs, reference_outputs
from squeeze.compress.export import export_onnx
from squeeze.compress.passes import PassContext, run_pass
from squeeze.compress.passes.quantize import QuantizeConfig, QuantizePass, onnx_check

torch.set_num_threads(1)

MINILM_RUNS = [  # (label, config, export)
    ("squeeze int8 default (repquant, dynamic)", {}, True),
    ("squeeze minmax, dynamic", {"method": "minmax"}, True),
    ("squeeze W8A8 static (repquant)", {"activations": "int8"}, True),
    ("squeeze W8A8 static (percentile)", {"activations": "int8", "method": "percentile"}, False),
    ("squeeze W8A8 static (bct, blocks of 64)", {"activations": "int8", "method": "bct"}, False),
    ("squeeze W6A6 (repquant)", {"weights": "int6", "activations": "int6"}, False),
    ("squeeze W4A4 (repquant)", {"weights": "int4", "activations": "int4"}, False),
    ("squeeze W4 weight-only (repquant)", {"weights": "int4", "activations": "none"}, False),
]


def quantize(ckpt, cfg: dict, data: DataSpec | None = None):
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=data)
    t = time.perf_counter()
    new = run_pass(QuantizePass(QuantizeConfig(**cfg)), [ckpt], ctx, measure_fidelity=False)
    return new, time.perf_counter() - t


def minilm(tmp: Path) -> dict:
    base = ck.load(MINILM)
    fam = base.family
    evalb = eval_batches(base, 100)
    ref = reference_outputs(base.model, fam, evalb)
    fp32 = export_fp32(base, tmp / "fp32.onnx")
    dyn = ort_dynamic(fp32, tmp / "ort_dynamic.onnx")
    rows = {
        "fp32 export": {"onnx": fp32, "fidelity": onnx_fidelity(fp32, ref)},
        "ORT quantize_dynamic (per-channel int8)": {"onnx": dyn, "fidelity": onnx_fidelity(dyn, ref)},
    }
    for label, cfg, export in MINILM_RUNS:
        ckpt = ck.load(MINILM)
        new, seconds = quantize(ckpt, cfg)
        row = {
            "config": cfg,
            "quantize_s": round(seconds, 1),
            "fidelity_twin": compare_outputs(ref, reference_outputs(new.model, fam, evalb)),
            "metrics": {k: v for k, v in new.manifest.ledger[-1]["metrics"].items() if k != "groups"},
        }
        if export:
            folder = ck.save(new, tmp / f"q{len(rows)}", force=True)
            saved = ck.load(folder)
            path = tmp / f"q{len(rows)}.onnx"
            rule = onnx_check.validation_rule(saved.manifest)
            report = export_onnx(saved, path, atol=100.0, rtol=100.0, force=True, latency=False)  # the rule decides
            row["validation"] = {
                "rule": rule,
                "checks": [{k: c[k] for k in ("shape", "cosine", "max_abs")} for c in report["validation"]],
                "ok": all(c["cosine"] >= rule["min_cosine"] for c in report["validation"]),
            }
            row["onnx"] = path
            row["fidelity"] = onnx_fidelity(path, ref)
        rows[label] = row
        print(label, row.get("fidelity", row["fidelity_twin"]), flush=True)
    graphs = {k: r["onnx"] for k, r in rows.items() if "onnx" in r}
    lat = latencies(graphs, base, rounds=9)
    for k, r in rows.items():
        if "onnx" in r:
            r["bytes"] = r["onnx"].stat().st_size
            r["latency_ms"] = lat[k]
            r["speedup"] = {b: lat["fp32 export"][b] / lat[k][b] for b in lat[k]}
            r["kernels"] = onnx_check.integer_kernels(r["onnx"])["integer_kernels"]
            r["onnx"] = r["onnx"].name
    return rows


# ----------------------------------------------------------------------------- tiny ViT on digits


def digits(tmp: Path) -> dict:
    import transformers as T
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    imgs = np.clip(x.reshape(-1, 8, 8) * 16, 0, 255).astype(np.uint8)  # 0..16 -> uint8 range
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    cfg = T.ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
        hidden_dropout_prob=0.0,
        architectures=["ViTForImageClassification"],
    )
    model = T.ViTForImageClassification(cfg)
    px_train, px_test = to_pixel_values(imgs[train], 1, 8), to_pixel_values(imgs[test], 1, 8)
    y_train, y_test = torch.as_tensor(y[train]), torch.as_tensor(y[test])
    epochs, batch = 60, 64
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * -(-len(train) // batch))
    t = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train))
        for i in range(0, len(train), batch):
            idx = perm[i : i + batch]
            loss = torch.nn.functional.cross_entropy(model(pixel_values=px_train[idx]).logits, y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    train_s = time.perf_counter() - t
    folder = tmp / "vit-digits"
    model.save_pretrained(str(folder))
    calib = tmp / "digits-train.npz"
    np.savez(calib, pixel_values=imgs[train], labels=y[train])

    def accuracy(m) -> float:
        with torch.no_grad():
            return float((m(pixel_values=px_test).logits.argmax(-1) == y_test).float().mean())

    table = {"fp32": accuracy(model), "train_s": round(train_s, 1)}
    data = DataSpec(source=str(calib), samples=256, batch_size=64, eval_samples=64)
    for method in ("repquant", "percentile", "minmax"):
        for bits in (8, 6, 4):
            new, _seconds = quantize(
                ck.load(folder), {"weights": f"int{bits}", "activations": f"int{bits}", "method": method}, data
            )
            table[f"{method} W{bits}A{bits}"] = accuracy(new.model)
            print(method, bits, table[f"{method} W{bits}A{bits}"], flush=True)
    return table


# ----------------------------------------------------------------------------- report


def _f(x: float, n: int = 4) -> str:
    return f"{x:.{n}f}"


def markdown(rows: dict, vit: dict) -> str:
    fp = rows["fp32 export"]
    lines = [
        "# quantize on all-MiniLM-L6-v2 (vs ONNX Runtime's quantize_dynamic) and a tiny ViT on load_digits",
        "",
        "Command: `.venv/bin/python benchmarks/bench_quantize.py`. Fidelity: cosine of the mean-pooled embedding vs "
        "PyTorch fp32 on 100 held-apart sentences (mean / worst), from ONNX Runtime's outputs where a graph was "
        "exported, from the PyTorch twin otherwise. Speed-up: fp32 latency / latency (ORT CPU, 2 threads, seq 128, "
        f"median of 9 interleaved rounds; fp32 = {fp['latency_ms'][1]:.2f} ms at batch 1, {fp['latency_ms'][8]:.2f} ms "
        "at batch 8). Integer kernels: node types in ORT's optimized graph.",
        "",
        "| model | size | cos mean | cos worst | speed-up b1 | speed-up b8 | integer kernels | twin vs ORT (validation) | quantize |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in rows.items():
        fid = r.get("fidelity", r.get("fidelity_twin"))
        src = "" if "fidelity" in r else " (twin)"
        size = f"{r['bytes'] / 1e6:.2f} MB" if "bytes" in r else "-"
        sp = f"{r['speedup'][1]:.2f}x" if "speedup" in r else "-"
        sp8 = f"{r['speedup'][8]:.2f}x" if "speedup" in r else "-"
        kern = ", ".join(f"{n} {c}" for n, c in sorted(r.get("kernels", {}).items())) or "-"
        val = "-"
        if "validation" in r:
            v = r["validation"]
            val = f"cos >= {min(c['cosine'] for c in v['checks']):.5f} ({'ok' if v['ok'] else 'FAIL'})"
        q = f"{r['quantize_s']:.0f} s" if "quantize_s" in r else "-"
        lines.append(
            f"| {k}{src} | {size} | {_f(fid['cos_mean'])} | {_f(fid['cos_worst'])} | {sp} | {sp8} | {kern} | {val} | {q} |"
        )
    lines += [
        "",
        f"Tiny ViT on load_digits (trained here in {vit['train_s']} s; test accuracy, 397 images; fp32 "
        f"{vit['fp32']:.4f}). Weights and activations at the same bits; patch embedding and head stay float.",
        "",
        "| method | W8A8 | W6A6 | W4A4 |",
        "|---|---|---|---|",
    ]
    for method in ("repquant", "percentile", "minmax"):
        lines.append(f"| {method} | " + " | ".join(f"{vit[f'{method} W{b}A{b}']:.4f}" for b in (8, 6, 4)) + " |")
    return "\n".join(lines)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        vit = digits(tmp)
        rows = minilm(tmp)
        total = time.perf_counter() - t
    write_results("quantize", {"minilm": rows, "vit_digits": vit, "seconds": round(total, 1)}, markdown(rows, vit))


if __name__ == "__main__":
    main()
