"""``factorize`` (DSFormer dense x sparse + STF) against low-rank and N:M sparsity at equal bytes.

    .venv/bin/python benchmarks/bench_factorize.py     # FACTORIZE_STEPS=48, FACTORIZE_RATIOS=0.3,0.5,0.7

all-MiniLM-L6-v2, every attention and MLP linear (36), at 30 / 50 / 70% of their fp32 bytes:

(a) truncated SVD (two dense factors) at equal bytes;
(b) N:M magnitude sparsity (n of every 16 weights along the input, fp32 values + 4-bit
    in-group positions) at equal bytes;
(c) dense x sparse, initialization only (alternating minimization from the SVD);
(d) (c) + the Straight-Through Factorizer (``STEPS`` distillation steps) + a fine-tune of D and
    S (``STEPS // 4``);
(e) (a) + the same distillation budget (``STEPS * 5 // 4`` steps, same lr, same data, same loss).

Training: the distillation engine, output + per-layer hidden-state loss against the unfactorized
model, on wiki sentences (``compress/train_data.py``), batch 8, 64 tokens (kept short: the CPU
is shared). Fidelity: cosine of the mean-pooled embedding against the original on the 100
held-apart built-in sentences (mean / worst). ONNX: size of the .onnx file, latency against the
fp32 export in a fresh process, interleaved (``compress/latency.py``), batch 1 and 8, 128 tokens.
Stacking: (d) with D and the S values rounded to int8 (per row of D, per column of S) against
int8 weights alone (per output channel, round to nearest), both weight-only PyTorch twins.

    FACTORIZE_PART=stack .venv/bin/python benchmarks/bench_factorize.py   # -> results/factorize_stack.*

The stack as real checkpoints at ``STACK_RATIO`` (50%): ``squeeze quantize`` (defaults: int8
weights, dynamic activations) on the float model against the same quantize on the factorized one
(init only, and + STF with ``STEPS`` + ``STEPS // 4`` steps), each saved (bytes on disk), exported
(validated, ONNX size) and timed against the fp32 export; and ``--allocation error`` against
uniform at the same budget (init only). The main table (parts (a)-(e)) is not re-run.
``FACTORIZE_REUSE=1`` keeps the rows of the last stack run (``FACTORIZE_REDO=label,label`` re-runs
those rows).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from common import MINILM, RESULTS, eval_batches, export_fp32, latency_feeds, write_results
from torch import nn

from squeeze.compress.calibration import DataSpec
from squeeze.compress.checkpoint import Checkpoint, save
from squeeze.compress.distill import DistillConfig, distill
from squeeze.compress.evaluate import compare_outputs, reference_outputs
from squeeze.compress.export import export_onnx
from squeeze.compress.latency import measure
from squeeze.compress.passes import PassContext, run_pass
from squeeze.compress.passes.factorize import DSLinear, FactorizeConfig, FactorizePass
from squeeze.compress.passes.factorize.train import finetune, train_stf
from squeeze.compress.passes.quantize import QuantizeConfig, QuantizePass
from squeeze.compress.run import load
from squeeze.compress.train_data import TrainSpec, training_batches, wiki_available

torch.set_num_threads(1)

STEPS = int(os.environ.get("FACTORIZE_STEPS", "48"))  # the committed results; ~40 min on 2 busy cores
RATIOS = tuple(float(r) for r in os.environ.get("FACTORIZE_RATIOS", "0.3,0.5,0.7").split(","))
LR = 1e-4
NM_GROUP, NM_INDEX_BITS = 16, 4


class LowRank(nn.Module):
    """W ~ U V: two dense factors (a rank-k linear)."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, k: int):
        super().__init__()
        u, sig, vh = torch.linalg.svd(w.double(), full_matrices=False)
        root = sig[:k].sqrt()
        self.down = nn.Linear(w.shape[1], k, bias=False)
        self.up = nn.Linear(k, w.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.down.weight.copy_(root[:, None] * vh[:k])
            self.up.weight.copy_(u[:, :k] * root)
            if bias is not None:
                self.up.bias.copy_(bias)

    def forward(self, x):
        return self.up(self.down(x))


def targets(model, fam):
    return [(i, key, mod) for i, layer in enumerate(fam.layers(model)) for key, mod in fam.linears(layer).items()]


def svd_model(model, fam, ratio):
    model = copy.deepcopy(model)
    nbytes = 0
    for i, key, mod in targets(model, fam):
        w = fam.linear_weight(mod).detach()
        out_f, in_f = w.shape
        k = max(1, math.floor(ratio * out_f * in_f / (out_f + in_f)))
        fam.set_linear(fam.layers(model)[i], key, LowRank(w, mod.bias.detach() if mod.bias is not None else None, k))
        nbytes += k * (out_f + in_f) * 4
    return model, nbytes


def nm_model(model, fam, ratio):
    """Keep the n largest |w| of every 16 along the input; bytes = fp32 values + 4-bit positions."""
    model = copy.deepcopy(model)
    n = math.floor(ratio * NM_GROUP * 32 / (32 + NM_INDEX_BITS))
    nbytes = 0
    for _, _, mod in targets(model, fam):
        w = fam.linear_weight(mod).detach().clone()
        out_f, in_f = w.shape
        g = w.reshape(out_f, in_f // NM_GROUP, NM_GROUP)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(n, dim=-1).indices, True)
        fam.set_linear_weight(mod, (g * keep).reshape(out_f, in_f))
        nbytes += out_f * in_f // NM_GROUP * n * (32 + NM_INDEX_BITS) // 8
    return model, nbytes, f"{n}:{NM_GROUP}"


def int8_rows(t: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 round to nearest, one scale per row (fake-quantized)."""
    scale = t.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(t / scale).clamp(-127, 127) * scale


def int8_ds(model):
    """D per row, S values per column (of S) to int8; returns the model and its linear bytes."""
    model = copy.deepcopy(model)
    nbytes = 0
    for m in model.modules():
        if isinstance(m, DSLinear):
            with torch.no_grad():
                m.dense.copy_(int8_rows(m.dense))
                m.values.copy_(int8_rows(m.values.t()).t())
            nbytes += m.dense.numel() + m.dense.shape[0] * 4 + m.values.numel() * (1 + m.indices.element_size())
            nbytes += m.values.shape[1] * 4
    return model, nbytes


def int8_dense(model, fam):
    model = copy.deepcopy(model)
    nbytes = 0
    for _, _, mod in targets(model, fam):
        w = fam.linear_weight(mod).detach()
        fam.set_linear_weight(mod, int8_rows(w))
        nbytes += w.numel() + w.shape[0] * 4
    return model, nbytes


def fid(model, fam, ref, ev):
    f = compare_outputs(ref, reference_outputs(model, fam, ev))
    return round(f["cos_mean"], 4), round(f["cos_worst"], 4)


def train(model, teacher, data, ctx, steps, modules):
    ids = {id(p) for m in modules for p in m.parameters()}
    cfg = DistillConfig(steps=steps, lr=LR, seed=0, layers_weight=1.0)
    return distill(model, teacher, data, cfg, ctx, trainable=lambda n, p: id(p) in ids).model_dump(mode="json")


def export(model, base, path: Path) -> Path:
    c = Checkpoint(model=model, family=base.family, manifest=base.manifest, source=base.source)
    export_onnx(c, path, force=True, latency=False)
    return path


def main() -> None:
    base = load(MINILM)
    fam = base.family
    ev = eval_batches(base, 100)
    ref = reference_outputs(base.model, fam, ev)
    src = "wiki" if wiki_available() else "builtin"
    data = training_batches(base, TrainSpec(source=src, samples=max(256, STEPS * 8), seq_len=64, batch_size=8))
    lin_bytes = sum(fam.linear_weight(m).numel() * 4 for _, _, m in targets(base.model, fam))
    tmp = Path(tempfile.mkdtemp(prefix="bench-factorize-"))
    fp32 = export_fp32(base, tmp / "fp32.onnx")
    feeds = {b: latency_feeds(base, b) for b in (1, 8)}
    rows, raw = (
        [],
        {
            "steps": STEPS,
            "finetune_steps": STEPS // 4,
            "lr": LR,
            "data": src,
            "linear_bytes": lin_bytes,
            "fp32_onnx_bytes": fp32.stat().st_size,
            "ratios": {},
        },
    )

    def lat(path):
        out = {}
        for b, f in feeds.items():
            m = measure(path, f, reference=fp32)
            out[b] = (round(m["latency_ratio"], 3), m["ratio_spread"])
        return out

    int8_alone, int8_bytes = int8_dense(base.model, fam)
    raw["int8_alone"] = {"cos": fid(int8_alone, fam, ref, ev), "linear_ratio": round(int8_bytes / lin_bytes, 4)}
    for ratio in RATIOS:
        r: dict = {}
        ctx = PassContext(family=fam, checkpoint=base, seed=0)
        t = time.perf_counter()
        cfg = FactorizeConfig(ratio=ratio, stf_steps=STEPS, finetune_steps=STEPS // 4, stf_lr=LR, finetune_lr=LR / 2)
        ds = FactorizePass(cfg.model_copy(update={"stf_steps": 0, "finetune_steps": 0})).apply(
            [copy.deepcopy(base.model)], ctx
        )
        ds_bytes = sum(
            m.stored_bytes() - (m.bias.numel() * 4 if m.bias is not None else 0)
            for m in ds.modules()
            if isinstance(m, DSLinear)
        )
        r["c_ds_init"] = {
            "cos": fid(ds, fam, ref, ev),
            "bytes": ds_bytes,
            "seconds": round(time.perf_counter() - t, 1),
            "init_error": ctx.metrics["init_error_mean"],
            "svd_error": ctx.metrics["svd_error_mean"],
        }
        path = export(ds, base, tmp / f"ds{ratio}.onnx")
        r["c_ds_init"].update(onnx_bytes=path.stat().st_size, latency=lat(path))
        t = time.perf_counter()
        stf = copy.deepcopy(ds)
        res = train_stf(stf, base.model, data, cfg, ctx)
        ft = finetune(stf, base.model, data, cfg, ctx) if STEPS // 4 else res
        r["d_ds_stf"] = {
            "cos": fid(stf, fam, ref, ev),
            "bytes": ds_bytes,
            "support_moved": res["support_moved"],
            "seconds": round(time.perf_counter() - t, 1),
            "loss": [res["loss_first"], ft["loss_last"]],
        }
        q, qbytes = int8_ds(stf)
        r["d_ds_stf_int8"] = {"cos": fid(q, fam, ref, ev), "bytes": qbytes}
        svd, svd_bytes = svd_model(base.model, fam, ratio)
        r["a_svd"] = {"cos": fid(svd, fam, ref, ev), "bytes": svd_bytes}
        path = export(svd, base, tmp / f"svd{ratio}.onnx")
        r["a_svd"].update(onnx_bytes=path.stat().st_size, latency=lat(path))
        t = time.perf_counter()
        low = [m for m in svd.modules() if isinstance(m, LowRank)]
        res = train(svd, base.model, data, ctx, STEPS + STEPS // 4, low)
        r["e_svd_distill"] = {
            "cos": fid(svd, fam, ref, ev),
            "bytes": svd_bytes,
            "seconds": round(time.perf_counter() - t, 1),
            "loss": [res["loss_first"], res["loss_last"]],
        }
        nm, nm_bytes, pattern = nm_model(base.model, fam, ratio)
        r["b_nm"] = {"cos": fid(nm, fam, ref, ev), "bytes": nm_bytes, "pattern": pattern}
        raw["ratios"][str(ratio)] = r
        print(ratio, r, flush=True)
        for key, label in (
            ("a_svd", "(a) truncated SVD"),
            ("b_nm", f"(b) N:M magnitude {pattern}"),
            ("c_ds_init", "(c) dense x sparse, init"),
            ("d_ds_stf", "(d) dense x sparse + STF"),
            ("e_svd_distill", "(e) SVD + same distillation"),
            ("d_ds_stf_int8", "(d) + int8 D, S values"),
        ):
            v = r[key]
            onnx_mb = f"{v['onnx_bytes'] / 1e6:.1f}" if "onnx_bytes" in v else "-"
            lat1 = f"{v['latency'][1][0]:.2f}" if "latency" in v else "-"
            lat8 = f"{v['latency'][8][0]:.2f}" if "latency" in v else "-"
            rows.append(
                f"| {ratio:.0%} | {label} | {v['bytes'] / lin_bytes:.3f} | {v['cos'][0]:.4f} | {v['cos'][1]:.4f} "
                f"| {onnx_mb} | {lat1} | {lat8} |"
            )
    head = (
        f"all-MiniLM-L6-v2, 36 attention + MLP linears ({lin_bytes / 1e6:.1f} MB fp32). STF: {STEPS} steps + "
        f"{STEPS // 4} fine-tune, (e): {STEPS + STEPS // 4} steps; lr {LR:g}; {src} text, batch 8 x 64 tokens. "
        f"Cosine of the mean-pooled embedding on 100 held-apart sentences. ONNX fp32: "
        f"{fp32.stat().st_size / 1e6:.1f} MB; latency = variant / fp32 (fresh process, interleaved, 128 tokens).\n\n"
        "| budget | method | linear bytes | cos mean | cos worst | ONNX MB | latency b1 | latency b8 |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    ia = raw["int8_alone"]
    tail = f"\nint8 weights alone (per channel, RTN): linear bytes {ia['linear_ratio']:.3f}, cos {ia['cos'][0]:.4f} / {ia['cos'][1]:.4f}\n"
    write_results("factorize", raw, head + "\n".join(rows) + "\n" + tail)


STACK_RATIO = float(os.environ.get("FACTORIZE_STACK_RATIO", "0.5"))
STACK_ROWS = (
    "fp32",
    "int8 alone",
    "DS init",
    "DS init + int8",
    "DS init + error allocation",
    "DS + STF",
    "DS + STF + int8",
)


def linear_bytes(model, fam) -> int:
    """Stored bytes of the 36 targeted linears, bias excluded (as in the main table)."""
    total = 0
    for _, _, mod in targets(model, fam):
        total += sum(t.nbytes for k, t in mod.state_dict().items() if not k.endswith("bias"))
    return total


def stack_main() -> None:
    base = load(MINILM)
    fam = base.family
    ev = eval_batches(base, 100)
    ref = reference_outputs(base.model, fam, ev)
    lin0 = linear_bytes(base.model, fam)
    tmp = Path(tempfile.mkdtemp(prefix="bench-factorize-stack-"))
    fp32 = export_fp32(base, tmp / "fp32.onnx")
    feeds = {b: latency_feeds(base, b) for b in (1, 8)}
    calib = DataSpec(source="builtin", samples=128, seq_len=128, batch_size=16)
    rows: dict[str, dict] = {}
    previous = RESULTS / "factorize_stack.json"
    if os.environ.get("FACTORIZE_REUSE") and previous.exists():  # rows of the last run, except FACTORIZE_REDO
        redo = set(os.environ.get("FACTORIZE_REDO", "").split(","))
        for k, v in json.loads(previous.read_text())["rows"].items():
            if k not in redo:
                rows[k] = {**v, "latency": {int(b): r for b, r in v["latency"].items()}}

    def need(*labels: str) -> bool:
        return any(k not in rows for k in labels)

    def record(label: str, ck_: Checkpoint, seconds: float, **extra) -> None:
        if label in rows:  # reused from the last run
            return
        folder = save(ck_, tmp / label.replace(" ", "_"), force=True)
        path = export(ck_.model, ck_, tmp / f"{label.replace(' ', '_')}.onnx")
        lat = {b: 1.0 for b in feeds} if label == "fp32" else {}
        for b, f in feeds.items() if not lat else ():
            lat[b] = round(measure(path, f, reference=fp32)["latency_ratio"], 3)
        rows[label] = {
            "cos": fid(ck_.model, fam, ref, ev),
            "linear_ratio": round(linear_bytes(ck_.model, fam) / lin0, 4),
            "safetensors_bytes": (folder / "model.safetensors").stat().st_size,
            "onnx_bytes": path.stat().st_size,
            "latency": lat,
            "seconds": round(seconds, 1),
            **extra,
        }
        print(label, rows[label], flush=True)

    def run(pass_, ckpt_):
        t = time.perf_counter()
        ctx = PassContext(family=fam, checkpoint=ckpt_, calibration=calib, seed=0)
        return run_pass(pass_, [ckpt_], ctx, measure_fidelity=False), time.perf_counter() - t

    if need("fp32"):
        record("fp32", base, 0.0)
    if need("int8 alone"):
        q, sec = run(QuantizePass(QuantizeConfig()), base)
        record("int8 alone", q, sec)
    if need("DS init", "DS init + int8", "DS + STF", "DS + STF + int8"):
        fac, sec = run(FactorizePass(FactorizeConfig(ratio=STACK_RATIO)), base)
        record("DS init", fac, sec, init_error=fac.manifest.ledger[-1]["metrics"]["init_error_mean"])
        if need("DS init + int8"):
            q, sec = run(QuantizePass(QuantizeConfig()), fac)
            record("DS init + int8", q, sec)
    if need("DS init + error allocation"):
        alloc, sec = run(FactorizePass(FactorizeConfig(ratio=STACK_RATIO, allocation="error")), base)
        record(
            "DS init + error allocation",
            alloc,
            sec,
            init_error=alloc.manifest.ledger[-1]["metrics"]["init_error_mean"],
            allocation=alloc.manifest.edits[-1]["result"]["allocation"],
        )
    if STEPS and need("DS + STF", "DS + STF + int8"):
        src = "wiki" if wiki_available() else "builtin"
        data = training_batches(base, TrainSpec(source=src, samples=max(256, STEPS * 8), seq_len=64, batch_size=8))
        cfg = FactorizeConfig(
            ratio=STACK_RATIO, stf_steps=STEPS, finetune_steps=STEPS // 4, stf_lr=LR, finetune_lr=LR / 2
        )
        t = time.perf_counter()
        stf = Checkpoint(model=copy.deepcopy(fac.model), family=fam, manifest=fac.manifest, source=fac.source)
        ctx = PassContext(family=fam, checkpoint=base, seed=0)
        train_stf(stf.model, base.model, data, cfg, ctx)
        finetune(stf.model, base.model, data, cfg, ctx)
        record("DS + STF", stf, time.perf_counter() - t, data=src)
        q, sec = run(QuantizePass(QuantizeConfig()), stf)
        record("DS + STF + int8", q, sec)
    rows = {k: rows[k] for k in STACK_ROWS if k in rows}
    head = (
        f"all-MiniLM-L6-v2, the 36 attention + MLP linears ({lin0 / 1e6:.1f} MB fp32) at {STACK_RATIO:.0%} of their "
        f"bytes; int8 = `squeeze quantize` defaults (int8 weights, dynamic activations, repquant = smoothquant+gptq; "
        f"DS layers: int8 D and S values, weight-only). STF: {STEPS} + {STEPS // 4} steps, lr {LR:g}. Cosine of the "
        "mean-pooled embedding on 100 held-apart sentences; latency = graph / fp32 export (fresh process, "
        "interleaved, 128 tokens).\n\n"
        "| model | linear bytes | cos mean | cos worst | safetensors MB | ONNX MB | latency b1 | latency b8 |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {k} | {v['linear_ratio']:.3f} | {v['cos'][0]:.4f} | {v['cos'][1]:.4f} | {v['safetensors_bytes'] / 1e6:.1f} "
        f"| {v['onnx_bytes'] / 1e6:.1f} | {v['latency'][1]:.2f} | {v['latency'][8]:.2f} |"
        for k, v in rows.items()
    ]
    a, u = rows["DS init + error allocation"], rows["DS init"]
    summary = a["allocation"]
    tail = (
        f"\n\nError allocation vs uniform at {STACK_RATIO:.0%} (init only): mean relative weight error "
        f"{a['init_error']:.4f} vs {u['init_error']:.4f}; cost (sum of error^2 x weights) {summary['cost']:.4g} vs "
        f"{summary['uniform_cost']:.4g} at {summary['measure_iters']} alternating steps.\n"
    )
    write_results(
        "factorize_stack", {"ratio": STACK_RATIO, "steps": STEPS, "rows": rows}, head + "\n".join(lines) + tail
    )


if __name__ == "__main__":
    stack_main() if os.environ.get("FACTORIZE_PART") == "stack" else main()
