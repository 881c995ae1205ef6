"""OT fusion (Transformer Fusion with Optimal Transport) on real data: sklearn's 8x8 digits.

Tiny ViTs of one shape (the merge benchmark's: patch 2, hidden 64, 3 layers, MLP 128) are
trained on the whole training split from different seeds; each pair is fused with
``squeeze fuse`` (vanilla averaging, OT with EMD / Sinkhorn on activation / weight costs, OT then
a short fine-tune distilling the parents' ensemble), and logit-averaged with ``squeeze merge``
for contrast (N forwards per input instead of one). Also: four models fused at once, and pairs
whose MLP widths differ (a 64-wide model fused into a 128-wide anchor). Control for the
fine-tune: the anchor parent distilled from the same ensemble for the same steps. Test accuracy,
mean ± std over three seed pairs.

    .venv/bin/python benchmarks/bench_fuse.py

Writes benchmarks/results/fuse.json and fuse.md.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ck, write_results
from digits_vit import VIT, accuracy, digits, logits_of, save_expert, train

from squeeze.cli.main import main as squeeze_main
from squeeze.compress.calibration import DataSpec
from squeeze.compress.passes import PassContext
from squeeze.compress.passes.fuse import FusePass

PAIRS = ((0, 1), (2, 3), (4, 5))  # training seeds of each pair; the second model is the anchor
QUADS = ((0, 1, 2, 3), (2, 3, 4, 5), (4, 5, 0, 1))
NARROW_MLP = 64
SAMPLES = 1280  # training images the fusion sees (activations) and the fine-tune trains on
FT_STEPS = 240  # 3 passes over the 80 batches
FT_LR = 1e-3
ONE_SHOT = {  # label: squeeze fuse options
    "vanilla": ["--solver", "none"],
    "OT emd acts": ["--solver", "emd"],
    "OT sinkhorn acts": ["--solver", "sinkhorn"],
    "OT sinkhorn acts (reg 0.02)": ["--solver", "sinkhorn", "--reg", "0.02"],
    "OT emd weights": ["--solver", "emd", "--cost", "weights"],
    "OT sinkhorn weights": ["--solver", "sinkhorn", "--cost", "weights"],
}
FINETUNED = {
    "vanilla + fine-tune": ["--solver", "none"],
    "OT emd acts + fine-tune": ["--solver", "emd"],
    "OT sinkhorn acts (reg 0.02) + fine-tune": ["--solver", "sinkhorn", "--reg", "0.02"],
    "OT sinkhorn acts + fine-tune": ["--solver", "sinkhorn"],
}


EPOCHS = 30  # the merge benchmark trains 40


def run_cli(args: list[str]) -> dict:
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = squeeze_main([*args, "--json"])
    assert code == 0, f"squeeze {args[0]} failed ({code})"
    return json.loads(printed.getvalue())


class Bench:
    def __init__(self, tmp: Path, xtr, ytr, xte, yte):
        self.tmp, self.xte, self.yte = tmp, xte, yte
        self.xtr, self.ytr = xtr, ytr
        self.data = tmp / "train.npz"
        np.savez(self.data, pixel_values=xtr, labels=ytr)
        self.folders: dict[str, Path] = {}
        self.n = 0

    def model(self, seed: int, mlp: int = VIT["intermediate_size"]) -> Path:
        key = f"s{seed}-m{mlp}"
        if key not in self.folders:
            model = train(self.xtr, self.ytr, seed, epochs=EPOCHS, mlp=mlp)
            self.folders[key] = save_expert(model, self.tmp / key)
        return self.folders[key]

    def acc(self, folder: Path) -> float:
        return accuracy(logits_of(ck.load(folder).model, self.xte), self.yte)

    def fuse(self, parents: list[Path], opts: list[str], finetune: bool = False) -> tuple[float, dict]:
        self.n += 1
        out = self.tmp / f"fused-{self.n}"
        extra = ["--finetune-steps", str(FT_STEPS), "--finetune-lr", str(FT_LR)] if finetune else []
        t = time.perf_counter()
        ledger = run_cli(["fuse", *map(str, parents), "-o", str(out), "--data", str(self.data),
                          "--samples", str(SAMPLES), *opts, *extra])  # fmt: skip
        ledger["seconds_total"] = round(time.perf_counter() - t, 2)
        return self.acc(out), ledger

    def merge(self, parents: list[Path]) -> float:
        self.n += 1
        out = self.tmp / f"merged-{self.n}"
        run_cli(["merge", *map(str, parents), "-o", str(out), "--data", str(self.data)])
        return self.acc(out)

    def parent_finetuned(self, parents: list[Path]) -> float:
        """Control: the anchor parent distilled from the same ensemble, same steps and data."""
        ckpts = [ck.load(p) for p in parents]
        ctx = PassContext(family=ckpts[-1].family, checkpoint=ckpts[0],
                          calibration=DataSpec(source=str(self.data), samples=SAMPLES))  # fmt: skip
        student = copy.deepcopy(ckpts[-1].model)
        fp = FusePass(finetune_steps=FT_STEPS, finetune_lr=FT_LR)
        fp._finetune(student, [c.model for c in ckpts], [1 / len(ckpts)] * len(ckpts), ctx)
        return accuracy(logits_of(student, self.xte), self.yte)


def group(bench: Bench, parents: list[Path], one_shot: dict, finetuned: dict, control: bool) -> dict:
    row: dict = {f"parent {i + 1}": bench.acc(p) for i, p in enumerate(parents)}
    row["better parent"] = max(row.values())
    row["logit merge"] = bench.merge(parents)
    ledgers = {}
    for label, opts in {**one_shot, **finetuned}.items():
        row[label], ledgers[label] = bench.fuse(parents, opts, finetune=label in finetuned)
    if control:
        row["anchor parent + same fine-tune"] = bench.parent_finetuned(parents)
        # how much a soft plan alone blurs: the anchor fused with itself (EMD would return it exactly)
        row["anchor fused with itself (sinkhorn)"] = bench.fuse(
            [parents[-1], parents[-1]], ONE_SHOT["OT sinkhorn acts"]
        )[0]
    row["seconds"] = {k: v["seconds"] for k, v in ledgers.items()}
    row["plan_sharpness"] = {k: v["metrics"]["fuse"]["plan_sharpness"] for k, v in ledgers.items()}
    print(" ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)), file=sys.stderr)
    return row


def summarize(rows: list[dict]) -> dict[str, tuple[float, float]]:
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    return {k: (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))) for k in keys}


def table(title: str, summary: dict, rows: list[dict]) -> list[str]:
    md = [f"**{title}**", "", "| model | test accuracy (mean ± std) | per seed group |", "|---|---|---|"]
    for k, (m, s) in summary.items():
        md.append(f"| {k} | {m:.3f} ± {s:.3f} | {', '.join(f'{r[k]:.3f}' for r in rows)} |")
    return [*md, ""]


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    xtr, xte, ytr, yte = digits()
    results: dict = {}
    quick = "--quick" in sys.argv  # one pair only, nothing written: a smoke run
    with tempfile.TemporaryDirectory() as tmp_:
        bench = Bench(Path(tmp_), xtr, ytr, xte, yte)
        if quick:
            group(bench, [bench.model(0), bench.model(1)], ONE_SHOT, FINETUNED, True)
            return
        results["pairs"] = [group(bench, [bench.model(a), bench.model(b)], ONE_SHOT, FINETUNED, True) for a, b in PAIRS]
        quad_one = {
            k: ONE_SHOT[k] for k in ("vanilla", "OT emd acts", "OT sinkhorn acts", "OT sinkhorn acts (reg 0.02)")
        }
        quad_ft = {"OT sinkhorn acts + fine-tune": FINETUNED["OT sinkhorn acts + fine-tune"]}
        results["quads"] = [group(bench, [bench.model(s) for s in q], quad_one, quad_ft, False) for q in QUADS]
        het_one = {
            k: ONE_SHOT[k]
            for k in ("OT emd acts", "OT sinkhorn acts", "OT sinkhorn acts (reg 0.02)", "OT sinkhorn weights")
        }
        results["hetero"] = [
            group(bench, [bench.model(a + 10, NARROW_MLP), bench.model(b)], het_one, quad_ft, False) for a, b in PAIRS
        ]
    summary = {k: summarize(v) for k, v in results.items()}
    seconds = time.perf_counter() - start
    md = [
        f"Digits (sklearn `load_digits`, 8x8): {len(xtr)} training / {len(xte)} test images. Tiny ViTs (patch 2, "
        f"hidden {VIT['hidden_size']}, {VIT['num_hidden_layers']} layers, MLP {VIT['intermediate_size']}), each trained "
        f"on the whole training split from its own seed. Fusion sees {SAMPLES} training images (activations: all "
        f"tokens, thinned to 4096 per neuron); the fine-tune distils the parents' ensemble (mean logits) into the "
        f"fused model for {FT_STEPS} steps (batch 16, lr {FT_LR}, cosine). Sinkhorn reg 0.08. The anchor is the last "
        f"parent. Seed pairs {list(PAIRS)}; quadruples {list(QUADS)}; the width pairs fuse a {NARROW_MLP}-wide MLP "
        f"model (seeds 10, 12, 14) into a {VIT['intermediate_size']}-wide anchor (seeds 1, 3, 5).",
        "",
        *table("Two models of one shape", summary["pairs"], results["pairs"]),
        *table("Four models (one-shot and fine-tuned fusion into the last)", summary["quads"], results["quads"]),
        *table(
            f"Different MLP widths ({NARROW_MLP} into {VIT['intermediate_size']})", summary["hetero"], results["hetero"]
        ),
        f"Command: `.venv/bin/python benchmarks/bench_fuse.py` ({seconds:.0f} s on a shared 2-core CPU).",
    ]
    write_results("fuse", {"config": {"vit": VIT, "pairs": PAIRS, "quads": QUADS, "narrow_mlp": NARROW_MLP,
                                      "samples": SAMPLES, "finetune_steps": FT_STEPS, "finetune_lr": FT_LR},
                           "results": results, "summary": summary, "seconds": round(seconds, 1)},
                  "\n".join(md))  # fmt: skip


if __name__ == "__main__":
    main()
