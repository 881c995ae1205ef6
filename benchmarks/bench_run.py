"""``squeeze run`` on the real all-MiniLM-L6-v2: the ledgers of the demo recipe and the drop-ratio
sweep, and what the step cache saves (a fresh run against a rerun where every step is finished,
and against a resume after the last step was lost), measured side by side in one process.

The ledger measures each export's latency when its step runs, so on a busy machine those numbers
drift; the table "side by side" measures every exported graph again, interleaved in rounds
with the fp32 export of the original (batch 1 and 8, 128 tokens), for ratios that can be trusted.

    .venv/bin/python benchmarks/bench_run.py [--samples N]

Writes benchmarks/results/run.json and run.md.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import MINILM, ROOT, ck, export_fp32, latencies, machine, write_results

from squeeze.compress import pipeline, report
from squeeze.compress.recipe import load_recipe

RECIPES = ("minilm-edge", "minilm-sweep")


def timed_run(recipe, out: Path) -> tuple[float, list]:
    """Wall time of pipeline.run (imports excluded; the models' files are hashed again each time)."""
    pipeline._HASHES.clear()
    start = time.perf_counter()
    results = pipeline.run(recipe, out)
    return time.perf_counter() - start, results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=None, help="cap calibration/eval samples (quick look)")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    args = ap.parse_args()
    data: dict = {"samples": args.samples, "recipes": {}}
    md: list[str] = []
    graphs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
            if args.samples:
                recipe = recipe.with_samples(args.samples)
            out = Path(tmp) / name
            fresh_s, results = timed_run(recipe, out)
            failed = [r.job for r in results if r.status != "ok"]
            if failed:
                raise SystemExit(f"{name}: jobs failed: {failed}: {[r.error for r in results if r.error]}")
            cached_s, _ = timed_run(recipe, out)
            # a resume: the last step of every job is lost (as if the run had been killed there)
            for jp in pipeline.plan(recipe, out):
                shutil.rmtree(jp.steps[-1].folder)
            resume_s, _ = timed_run(recipe, out)
            rep = report.build(results, out, f"recipes/{name}.yaml", [j.name for j in recipe.jobs])
            data["recipes"][name] = {
                "fresh_s": round(fresh_s, 2),
                "cached_rerun_s": round(cached_s, 2),
                "resume_last_step_s": round(resume_s, 2),
                "report": rep,
            }
            md += [
                f"### `squeeze run recipes/{name}.yaml`",
                "",
                f"Fresh run {fresh_s:.1f} s; rerun with every step finished {cached_s:.2f} s (in process: "
                f"imports excluded, the model's files hashed again) "
                f"({fresh_s / cached_s:.0f}x less); resume after losing each job's last step "
                f"{resume_s:.1f} s ({fresh_s / resume_s:.1f}x less).",
                "",
            ]
            md += [*report.markdown(rep).split("\n", 2)[2].strip().splitlines(), ""]
            for jp in pipeline.plan(recipe, out):
                if jp.steps[-1].name == "export":
                    graphs[jp.job.name] = jp.steps[-1].folder / pipeline.ONNX_NAME
        original = ck.load(MINILM)
        paths = {"fp32 export of the original": export_fp32(original, Path(tmp) / "fp32.onnx"), **graphs}
        lat = latencies(paths, original)
        base = lat["fp32 export of the original"]
        data["side_by_side_latency_ms"] = lat
        md += [
            "### Side by side (ONNX Runtime CPU, 2 threads, 128 tokens, median, interleaved rounds)",
            "",
            "| graph | size | latency b1 | latency b8 | speed-up b1 | speed-up b8 |",
            "|---|---|---|---|---|---|",
        ]
        for name, path in paths.items():
            md.append(
                f"| {name} | {path.stat().st_size / 2**20:.1f} MB | {lat[name][1]:.2f} ms | {lat[name][8]:.2f} ms | "
                f"{base[1] / lat[name][1]:.2f}x | {base[8] / lat[name][8]:.2f}x |"
            )
    m = machine()
    head = [
        f"all-MiniLM-L6-v2 on {m['cores']} CPU cores (torch {m['torch']}, onnxruntime {m['onnxruntime']}); "
        + (f"calibration/evaluation capped at {args.samples} samples" if args.samples else "recipes as written"),
        "",
    ]
    write_results("run", data, "\n".join(head + md))


if __name__ == "__main__":
    main()
