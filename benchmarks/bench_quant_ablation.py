"""Which of RepQuant's steps earn their time at W4A4 on all-MiniLM-L6-v2 (issue 17's ablation).

    .venv/bin/python benchmarks/bench_quant_ablation.py [--bits 4] [--only LABEL ...]

Each row is one ``squeeze quantize`` run on the real checkpoint with static activations at the
same bits as the weights (PyTorch twin; ORT has no integer kernels below 8 bits), changing one
thing against the full scheme (``--method repquant``: learned dual clipping, GPTQ rounding,
log-sqrt2 softmax, and squeeze's own per-channel reparameterization of the MLP output's input):

* dual clipping off (``clip_steps=0``: per-channel percentile/MSE ranges, not learned);
* GPTQ off (round to nearest on the same grid);
* a uniform softmax quantizer instead of log-sqrt2;
* the MLP output (fc2) input left per-tensor (``fc2_reparam=False``, RepQ-ViT's scope);
* the plain baselines ``--method percentile`` and ``--method minmax`` (per-tensor activation
  ranges from the percentile/MSE search or from min/max, round to nearest, uniform softmax).

Fidelity: cosine of the mean-pooled embedding vs PyTorch fp32 on 100 held-apart sentences (mean /
worst). Seconds: the pass alone, single-threaded, on a shared 2-core machine (indicative).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import MINILM, eval_batches, write_results

from squeeze.compress import checkpoint as ck
from squeeze.compress.evaluate import compare_outputs, reference_outputs
from squeeze.compress.passes import PassContext, run_pass
from squeeze.compress.passes.quantize import QuantizeConfig, QuantizePass

torch.set_num_threads(1)

FULL = "repquant (full: dual clipping, GPTQ, log-sqrt2, fc2 reparam)"
ROWS = [  # (label, config changes against the full scheme)
    (FULL, {}),
    ("- dual clipping (percentile/MSE per-channel ranges)", {"clip_steps": 0}),
    ("- GPTQ (round to nearest)", {"gptq": False}),
    ("uniform softmax instead of log-sqrt2", {"softmax": "uniform"}),
    ("- fc2 reparam (RepQ-ViT's scope)", {"fc2_reparam": False}),
    ("percentile (per-tensor activations, RTN)", {"method": "percentile"}),
    ("minmax (per-tensor activations, RTN)", {"method": "minmax"}),
]


def run(bits: int, only: list[str] | None) -> dict:
    base = ck.load(MINILM)
    fam = base.family
    evalb = eval_batches(base, 100)
    ref = reference_outputs(base.model, fam, evalb)
    rows = {}
    for label, change in ROWS:
        if only and not any(o in label for o in only):
            continue
        cfg = {"weights": f"int{bits}", "activations": f"int{bits}", **change}
        ckpt = ck.load(MINILM)
        ctx = PassContext(family=fam, checkpoint=ckpt)
        t = time.perf_counter()
        new = run_pass(QuantizePass(QuantizeConfig(**cfg)), [ckpt], ctx, measure_fidelity=False)
        seconds = time.perf_counter() - t
        scheme = new.manifest.ledger[-1]["metrics"]["scheme"]
        rows[label] = {
            "config": cfg,
            "seconds": round(seconds, 1),
            "fidelity": compare_outputs(ref, reference_outputs(new.model, fam, evalb)),
            "algorithm": scheme["algorithm"],
            "extensions": scheme["extensions"],
            "softmax": scheme["softmax"],
        }
        print(label, rows[label]["fidelity"], rows[label]["seconds"], flush=True)
    return rows


def markdown(rows: dict, bits: int, command: str) -> str:
    full = rows.get(FULL)
    lines = [
        f"# RepQuant component ablation, W{bits}A{bits} static, all-MiniLM-L6-v2 (PyTorch twin)",
        "",
        f"Command: `{command}`. Fidelity: cosine of the mean-pooled embedding vs fp32 on 100 held-apart "
        "sentences. Delta: cos mean minus the full scheme's. Seconds: the pass alone, one thread, shared "
        "2-core machine (indicative). Recorded: the ledger's `algorithm` (+ `ext` when the run carries "
        "squeeze's extension beyond RepQ-ViT, the per-channel fc2-input reparameterization).",
        "",
        "| variant | cos mean | cos worst | delta mean | seconds | recorded |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        f = r["fidelity"]
        delta = f"{f['cos_mean'] - full['fidelity']['cos_mean']:+.4f}" if full else "-"
        rec = r["algorithm"] + (" + ext" if r["extensions"] else "")
        lines.append(f"| {label} | {f['cos_mean']:.4f} | {f['cos_worst']:.4f} | {delta} | {r['seconds']:.0f} | {rec} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="run only the rows whose label contains one of these")
    args = ap.parse_args()
    command = ".venv/bin/python benchmarks/bench_quant_ablation.py" + (f" --bits {args.bits}" if args.bits != 4 else "")
    t = time.perf_counter()
    rows = run(args.bits, args.only)
    name = "quant_ablation" if args.bits == 4 else f"quant_ablation_w{args.bits}"
    data = {"bits": args.bits, "rows": rows, "seconds": round(time.perf_counter() - t, 1), "command": command}
    write_results(name, data, markdown(rows, args.bits, command))


if __name__ == "__main__":
    main()
