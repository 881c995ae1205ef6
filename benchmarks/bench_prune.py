"""``prune`` on the real all-MiniLM-L6-v2, and decode speed of a tiny Llama.

    .venv/bin/python benchmarks/bench_prune.py [--ablation]

MiniLM (6 layers), one-shot LLM-Drop ranking from one scoring of the unpruned model on the
built-in calibration text (128 samples, <= 128 tokens):

* fidelity of 1..6 attention, 1..3 MLP and 1..3 block drops (cosine of the mean-pooled
  embedding against the original on the 100 held-apart evaluation sentences, mean and worst,
  ``compress/evaluate.py``), with BERT's two post-LN choices (keep the dropped sublayer's
  LayerNorm or not) side by side, plus joint drops of 2 and 4 and iterative attention drops;
* ONNX Runtime latency of each default variant against the fp32 export of the original, all
  graphs in one process, interleaved in rounds (CPU, 2 threads, batch 1 and 8, sequence 128,
  median after warm-up), as a speed-up ratio;
* wall time and peak memory (RSS) of the scoring, next to one plain forward over the same data.

Tiny Llama (8 layers, hidden 256, random weights): greedy decode tokens/s with the KV cache,
before and after dropping half the attention layers, and the KV cache's size.

``--ablation`` (results/prune_ablation.md): every layer of each kind dropped alone, the Spearman
rank correlation between its score S and its measured fidelity loss, and the fidelity lost per
unit of speed-up per kind (speed-ups from results/prune.json).
"""

from __future__ import annotations

import copy
import json
import sys
import time

import numpy as np
import torch
from common import MINILM, RESULTS, THREADS, eval_batches, export_fp32, latency_feeds, write_results

import squeeze.compress as ck  # load (= run.load), Checkpoint
from squeeze.compress.calibration import model_inputs
from squeeze.compress.evaluate import (
    PeakMemory,
    compare_outputs,
    current_rss_mb,
    ort_latency_ms,
    ort_session,
    reference_outputs,
)
from squeeze.compress.passes import PassContext
from squeeze.compress.passes.prune import Plan, PrunePass, layer_scores, rank_joint, top_k

torch.set_num_threads(2)


def minilm() -> dict:
    ckpt = ck.load(MINILM)
    fam, model = ckpt.family, ckpt.model
    ctx = PassContext(family=fam, checkpoint=ckpt)
    calib = ctx.calib_batches()
    evalb = eval_batches(ckpt, 100)
    ref = reference_outputs(model, fam, evalb)

    def fidelity(new: torch.nn.Module) -> dict:
        return compare_outputs(ref, reference_outputs(new, fam, evalb))

    # ---- scoring cost, next to a plain forward over the same batches (interleaved: load comes in bursts)
    plain_t, score_t, extra_mb = [], [], []
    for _ in range(3):
        t = time.perf_counter()
        with torch.no_grad():
            for b in calib:
                model(**model_inputs(b))
        plain_t.append(time.perf_counter() - t)
        rss0 = current_rss_mb()
        t = time.perf_counter()
        with PeakMemory() as mem:
            scores = layer_scores(model, fam, calib)
        score_t.append(time.perf_counter() - t)
        extra_mb.append(mem.peak_mb - rss0)
    cost = {
        "calib_samples": sum(len(b["input_ids"]) for b in calib),
        "score_seconds": round(float(np.median(score_t)), 2),
        "plain_forward_seconds": round(float(np.median(plain_t)), 2),
        "score_over_plain": round(float(np.median(np.array(score_t) / np.array(plain_t))), 2),
        "rss_before_mb": round(rss0, 1),
        "peak_rss_mb": round(mem.peak_mb, 1),
        "peak_extra_mb": round(float(max(extra_mb)), 1),
    }
    print("scoring", cost)

    def variant(**result) -> torch.nn.Module:
        plan = Plan(num_layers=6, **result)
        return PrunePass.apply_plan(copy.deepcopy(model), plan, fam)

    rows: list[dict] = []
    for kind, counts in (("attention", range(1, 7)), ("mlp", range(1, 4)), ("blocks", range(1, 4))):
        key = {"attention": "attn", "mlp": "mlp", "blocks": "block"}[kind]
        for k in counts:
            idx = top_k(scores[key], k)
            row = {"drop": kind, "k": k, "layers": idx}
            for keep in (True, False) if kind != "blocks" else (None,):
                f = fidelity(variant(**{kind: idx}, keep_norm=keep))
                tag = "" if keep in (True, None) else "_no_norm"
                row[f"cos_mean{tag}"], row[f"cos_worst{tag}"] = f["cos_mean"], f["cos_worst"]
            rows.append(row)
            print(row)
    extra: list[dict] = []
    for k in (2, 4):
        att, mlp = rank_joint(scores["attn"], scores["mlp"], k)
        f = fidelity(variant(attention=att, mlp=mlp, keep_norm=True))
        extra.append(
            {
                "drop": "joint",
                "k": k,
                "layers": {"attention": att, "mlp": mlp},
                "cos_mean": f["cos_mean"],
                "cos_worst": f["cos_worst"],
            }
        )
    t = time.perf_counter()
    plan = PrunePass(drop_attn=3, iterative=True).plan(model, ctx)
    f = fidelity(variant(attention=plan.attention, keep_norm=True))
    extra.append(
        {
            "drop": "attention iterative",
            "k": 3,
            "layers": plan.attention,
            "cos_mean": f["cos_mean"],
            "cos_worst": f["cos_worst"],
            "seconds": round(time.perf_counter() - t, 2),
        }
    )
    print(extra)

    # ---- ONNX Runtime latency: every default variant exported once, timed side by side
    onnx_dir = RESULTS.parent / ".onnx_prune"
    onnx_dir.mkdir(exist_ok=True)
    paths = {"fp32": export_fp32(ckpt, onnx_dir / "fp32.onnx")}
    for row in rows:
        name = f"{row['drop']}-{row['k']}"
        pruned = ck.Checkpoint(
            model=variant(**{row["drop"]: row["layers"]}, keep_norm=True),
            family=fam,
            manifest=ckpt.manifest,
            source=ckpt.source,
        )
        paths[name] = export_fp32(pruned, onnx_dir / f"{name}.onnx")  # validated against PyTorch, or raises
        row["onnx_mb"] = round(paths[name].stat().st_size / 2**20, 1)
    lat = interleaved_latencies(paths, ckpt)
    for row in rows:
        name = f"{row['drop']}-{row['k']}"
        for b in (1, 8):
            row[f"ms_b{b}"] = round(lat[name][b], 2)
            row[f"speedup_b{b}"] = round(lat["fp32"][b] / lat[name][b], 3)
    fp32 = {f"ms_b{b}": round(lat["fp32"][b], 2) for b in (1, 8)}
    fp32["onnx_mb"] = round(paths["fp32"].stat().st_size / 2**20, 1)
    for p in onnx_dir.glob("*"):
        p.unlink()
    onnx_dir.rmdir()
    return {
        "scores": {k: [round(x, 4) for x in v] for k, v in scores.items()},
        "scoring": cost,
        "rows": rows,
        "extra": extra,
        "fp32": fp32,
    }


def interleaved_latencies(paths: dict, ckpt, batch_sizes=(1, 8), rounds: int = 8, runs: int = 4) -> dict:
    """Median latency (ms) per graph. The machine is shared and its load comes in bursts, so
    graphs take turns in many short rounds (1 warm-up + ``runs`` timed calls each) and the
    median is over the rounds' medians: a burst hits every graph about alike."""
    sessions = {k: ort_session(v, threads=THREADS) for k, v in paths.items()}
    out: dict = {}
    for b in batch_sizes:
        feeds = latency_feeds(ckpt, b)
        per: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(rounds):
            for k, sess in sessions.items():
                names = {i.name for i in sess.get_inputs()}
                per[k].append(ort_latency_ms(sess, {n: v for n, v in feeds.items() if n in names}, warmup=1, runs=runs))
        for k, v in per.items():
            out.setdefault(k, {})[b] = float(np.median(v))
    return out


def tiny_llama_decode(prompt: int = 32, new: int = 64, rounds: int = 7) -> dict:
    from tiny import build_tiny

    from squeeze.compress.families import family_for

    base = build_tiny("llama", layers=8, hidden=256, seed=0)
    fam = family_for("llama")
    dropped = PrunePass.apply_plan(copy.deepcopy(base), Plan(num_layers=8, attention=[1, 3, 5, 7]), fam)
    out: dict = {"layers": 8, "hidden": 256, "attention_dropped": [1, 3, 5, 7], "prompt": prompt, "new_tokens": new}
    for batch in (1, 8):
        ids = torch.randint(5, 300, (batch, prompt), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {"original": [], "half_attention": []}

        def gen(m, n, ids=ids):
            return m.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                use_cache=True,
            )

        for m in (base, dropped):
            gen(m, 4)  # warm-up
        for _ in range(rounds):  # interleaved, so drift hits both alike
            for name, m in (("original", base), ("half_attention", dropped)):
                t = time.perf_counter()
                with torch.no_grad():
                    gen(m, 1)  # prefill (+1 token)
                t1 = time.perf_counter()
                gen(m, new + 1)
                t2 = time.perf_counter()
                times[name].append((t2 - t1) - (t1 - t))  # decode of `new` tokens
        res = {name: round(batch * new / float(np.median(v)), 1) for name, v in times.items()}
        res["speedup"] = round(res["half_attention"] / res["original"], 3)
        out[f"decode_tokens_per_s_b{batch}"] = res
        print("decode", batch, res)
    for name, m in (("original", base), ("half_attention", dropped)):
        cache = m(torch.randint(5, 300, (1, prompt)), use_cache=True).cache
        out[f"kv_cache_bytes_{name}"] = int(
            sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
        )
        out[f"kv_cache_slots_{name}"] = len(cache.layers)
    return out


def table(m: dict, d: dict) -> str:
    s = m["scoring"]
    lines = [
        "# prune (LLM-Drop) on all-MiniLM-L6-v2",
        "",
        "Command: `.venv/bin/python benchmarks/bench_prune.py`. One-shot ranking from one scoring of the unpruned model "
        f"(built-in calibration text, {s['calib_samples']} samples). Fidelity: cosine of the mean-pooled embedding vs the "
        "original on 100 held-apart sentences (mean / worst). Speed-up: ONNX Runtime latency of the fp32 export of the "
        f"original divided by the variant's (CPU, 2 threads, seq 128, median of 8 interleaved rounds; fp32 = {m['fp32']['ms_b1']} ms at batch 1, "
        f"{m['fp32']['ms_b8']} ms at batch 8). BERT is post-LN: the default keeps a dropped sublayer's LayerNorm; the "
        "no-norm column is the other choice.",
        "",
        "| dropped | layers | cos mean | cos worst | no-norm mean / worst | speed-up b1 | speed-up b8 | ONNX MB |",
        "|---|---|---|---|---|---|---|---|",
        f"| nothing (fp32) | - | 1 | 1 | - | 1.000 | 1.000 | {m['fp32']['onnx_mb']} |",
    ]
    for r in m["rows"]:
        nn = f"{r['cos_mean_no_norm']:.4f} / {r['cos_worst_no_norm']:.4f}" if "cos_mean_no_norm" in r else "-"
        lines.append(
            f"| {r['k']} {r['drop']} | {r['layers']} | {r['cos_mean']:.4f} | {r['cos_worst']:.4f} | {nn} | "
            f"{r['speedup_b1']:.3f} | {r['speedup_b8']:.3f} | {r['onnx_mb']} |"
        )
    for r in m["extra"]:
        lines.append(
            f"| {r['k']} {r['drop']} | {r['layers']} | {r['cos_mean']:.4f} | {r['cos_worst']:.4f} | - | - | - | - |"
        )
    lines += [
        "",
        f"Scoring: {s['score_seconds']} s for 6 layers x {s['calib_samples']} samples, {s['score_over_plain']}x one plain "
        f"forward over the same batches ({s['plain_forward_seconds']} s; medians of 3 interleaved rounds); peak RSS "
        f"{s['peak_rss_mb']} MB, {s['peak_extra_mb']} MB above the process before scoring.",
        "",
        f"Scores S (attention / MLP / block per layer): {m['scores']['attn']} / {m['scores']['mlp']} / {m['scores']['block']}",
        "",
        f"## Tiny Llama decode ({d['layers']} layers, hidden {d['hidden']}, random weights; greedy, KV cache, "
        f"prompt {d['prompt']}, {d['new_tokens']} new tokens, torch CPU 2 threads)",
        "",
        "| batch | tokens/s original | tokens/s half attention dropped | speed-up |",
        "|---|---|---|---|",
    ]
    for b in (1, 8):
        r = d[f"decode_tokens_per_s_b{b}"]
        lines.append(f"| {b} | {r['original']} | {r['half_attention']} | {r['speedup']:.3f} |")
    lines += [
        "",
        f"KV cache after the prompt: {d['kv_cache_slots_original']} slots, {d['kv_cache_bytes_original']} bytes "
        f"-> {d['kv_cache_slots_half_attention']} slots, {d['kv_cache_bytes_half_attention']} bytes.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- ablation (issue 17)

KINDS = (("attention", "attn"), ("mlp", "mlp"), ("blocks", "block"))


def ablation() -> dict:
    """Each layer dropped alone (per kind), its measured fidelity loss against its LLM-Drop score S;
    and fidelity lost per unit of speed-up per kind, from the speed-ups of results/prune.json."""
    from scipy.stats import spearmanr

    ckpt = ck.load(MINILM)
    fam, model = ckpt.family, ckpt.model
    ctx = PassContext(family=fam, checkpoint=ckpt)
    scores = layer_scores(model, fam, ctx.calib_batches())
    evalb = eval_batches(ckpt, 100)
    ref = reference_outputs(model, fam, evalb)
    n = len(scores["attn"])
    single: dict[str, list[dict]] = {}
    for kind, key in KINDS:
        single[kind] = []
        for i in range(n):
            new = PrunePass.apply_plan(copy.deepcopy(model), Plan(num_layers=n, keep_norm=True, **{kind: [i]}), fam)
            f = compare_outputs(ref, reference_outputs(new, fam, evalb))
            single[kind].append({"layer": i, "S": round(scores[key][i], 4), "loss": round(1 - f["cos_mean"], 4)})
            print(kind, single[kind][-1], flush=True)
    corr = {}
    for kind, _ in KINDS:
        s, loss = [r["S"] for r in single[kind]], [r["loss"] for r in single[kind]]
        rho, p = spearmanr(s, loss)
        corr[kind] = {
            "rho": round(float(rho), 3),
            "p": round(float(p), 3),
            "top_by_S": max(range(n), key=s.__getitem__),
            "least_loss": min(range(n), key=loss.__getitem__),
        }
    both = single["attention"] + single["mlp"]  # the joint ranking pools the two kinds
    rho, p = spearmanr([r["S"] for r in both], [r["loss"] for r in both])
    corr["attention+mlp (joint)"] = {"rho": round(float(rho), 3), "p": round(float(p), 3)}
    measured = json.loads((RESULTS / "prune.json").read_text())["minilm"]["rows"]
    per_speedup = [
        {
            "drop": r["drop"],
            "k": r["k"],
            "loss": round(1 - r["cos_mean"], 4),
            **{f"loss_per_speedup_b{b}": round((1 - r["cos_mean"]) / (r[f"speedup_b{b}"] - 1), 3) for b in (1, 8)},
        }
        for r in measured
        if r["speedup_b1"] > 1 and r["speedup_b8"] > 1
    ]
    return {"scores": scores, "single": single, "spearman": corr, "loss_per_speedup": per_speedup}


def ablation_table(a: dict) -> str:
    lines = [
        "# prune ablation on all-MiniLM-L6-v2: score vs measured loss, loss per unit of speed-up",
        "",
        "Command: `.venv/bin/python benchmarks/bench_prune.py --ablation`. Loss: 1 - cosine of the mean-pooled "
        "embedding vs the original on 100 held-apart sentences (mean), the dropped sublayer's LayerNorm kept (the "
        "default). S: the LLM-Drop score from the unpruned model (higher = dropped first).",
        "",
        "## Each layer dropped alone",
        "",
        "| kind | " + " | ".join(f"layer {i} S / loss" for i in range(len(a["scores"]["attn"]))) + " |",
        "|---|" + "---|" * len(a["scores"]["attn"]),
    ]
    for kind, _ in KINDS:
        lines.append(f"| {kind} | " + " | ".join(f"{r['S']:.4f} / {r['loss']:.4f}" for r in a["single"][kind]) + " |")
    lines += [
        "",
        "Spearman rank correlation between S and the measured loss (a faithful score gives rho near -1: the "
        "highest S loses least):",
        "",
        "| kind | rho | p | layer with the highest S | layer with the least loss |",
        "|---|---|---|---|---|",
    ]
    for kind, c in a["spearman"].items():
        lines.append(
            f"| {kind} | {c['rho']:.3f} | {c['p']:.3f} | {c.get('top_by_S', '-')} | {c.get('least_loss', '-')} |"
        )
    lines += [
        "",
        "## Fidelity lost per unit of speed-up (the paper's SDR: (1 - cos mean) / (speed-up - 1))",
        "",
        "Speed-ups: ONNX Runtime, the committed run of `bench_prune.py` (results/prune.json); lower is better.",
        "",
        "| dropped | loss | per speed-up b1 | per speed-up b8 |",
        "|---|---|---|---|",
    ]
    for r in a["loss_per_speedup"]:
        lines.append(
            f"| {r['k']} {r['drop']} | {r['loss']:.4f} | {r['loss_per_speedup_b1']:.3f} | {r['loss_per_speedup_b8']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    if "--ablation" in sys.argv[1:]:
        a = ablation()
        write_results("prune_ablation", a, ablation_table(a))
        return
    start = time.perf_counter()
    m = minilm()
    d = tiny_llama_decode()
    data = {"minilm": m, "tiny_llama_decode": d, "total_seconds": round(time.perf_counter() - start, 1)}
    write_results("prune", data, table(m, d))


if __name__ == "__main__":
    main()
