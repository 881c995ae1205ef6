"""The mutation scores table: benchmarks/results/mutation_<folder>.json -> benchmarks/results/mutation.md.

    .venv/bin/python tests/mutation/table.py [--add build/mutate/prune/summary.json ...] [--first ...]
        [--more SUMMARY_OF_ANOTHER_SEED ...] [--more-first ...]

``--add`` copies a run's summary (tests/mutation/sample.py) into benchmarks/results/. Survivors
judged equivalent (no test can tell them from the original) are listed, with one line of reasoning
each, in tests/mutation/equivalent.json; the score is given raw (killed / checked) and with those
equivalent survivors taken out of the denominator (the usual mutation score).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
EQUIVALENT = Path(__file__).with_name("equivalent.json")
ORDER = ["prune", "quantize", "merge", "kernels", "factorize", "reparam", "fuse", "distill"]
FOLDER_PATHS = {
    "kernels": "kernels/",
    "distill": "compress/passes/distill/ + compress/distill.py",
}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def short(name: str) -> str:
    """squeeze.compress.passes.prune.prune.xǁPlanǁresult__mutmut_21 -> prune.py Plan.result #21"""
    module, _, rest = name.rpartition(".x")
    func, _, number = rest.partition("__mutmut_")
    func = func[1:] if func.startswith("_") else func.strip("ǁ")  # mutmut names x_<function>, xǁ<Class>ǁ<method>
    return f"{module.rsplit('.', 1)[-1]}.py {func.replace('ǁ', '.')} #{number}"


def row(s: dict, equivalent: dict[str, str]) -> tuple[str, list[str]]:
    killed = s["killed"] + s["timeout"]
    crashed = s.get("crashed", 0)
    eq = [n for n in s["survivors"] if n in equivalent]
    lo, hi = wilson(killed + crashed, s["checked"] - len(eq))
    score = killed / s["checked"] if s["checked"] else 0.0
    adjusted = (killed + crashed) / (s["checked"] - len(eq)) if s["checked"] - len(eq) else 0.0
    sample = f"sample, seed {s['seed']}" if s["seed"] is not None else "all"
    path = FOLDER_PATHS.get(s["folder"], f"compress/passes/{s['folder']}/")
    line = (
        f"| {path} | {s['mutants_total']} / {s['checked']} ({sample}) | {killed} | {s['survived']} | "
        f"{s['no_tests']} | {s['timeout']} | {crashed} | {score:.1%} | **{adjusted:.1%}** ({lo:.0%}-{hi:.0%}) | {len(eq)} |"
    )
    notes = [f"- `{short(n)}`: {equivalent[n]}" for n in eq]
    real = [short(n) for n in s["survivors"] + s["no_tests_mutants"] if n not in equivalent]
    if real:
        notes.append(f"- not killed, not judged equivalent ({len(real)}): " + "; ".join(f"`{r}`" for r in real))
    return line, notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--add", type=Path, nargs="*", default=[])
    parser.add_argument("--first", type=Path, nargs="*", default=[], help="first-pass summaries (before new tests)")
    parser.add_argument("--more", type=Path, nargs="*", default=[], help="further samples (another seed) of a folder")
    parser.add_argument("--more-first", type=Path, nargs="*", default=[], help="their first passes")
    args = parser.parse_args()
    for paths, tail in ((args.more, ""), (args.more_first, "_first")):
        for path in paths:
            more = json.loads(path.read_text())
            shutil.copyfile(path, RESULTS / f"mutation_{more['folder']}_more_seed{more['seed']}{tail}.json")
    for path in args.add:
        folder = json.loads(path.read_text())["folder"]
        shutil.copyfile(path, RESULTS / f"mutation_{folder}.json")
    for path in args.first:
        folder = json.loads(path.read_text())["folder"]
        shutil.copyfile(path, RESULTS / f"mutation_{folder}_first.json")
    equivalent: dict[str, str] = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    out = [
        "# Mutation testing (mutmut 3.8.1): scores per algorithm folder",
        "",
        "Written by `tests/mutation/table.py` from `benchmarks/results/mutation_<folder>.json` (each from",
        "`make mutate PASS=<folder> SAMPLE=<n>`, i.e. `tests/mutation/sample.py`: a copy of the committed",
        "HEAD, the folder's tests only, `-x`, one child, one torch thread). Where a sample was drawn, the",
        "score is an estimate over that uniform random sample; the interval is Wilson's 95% interval.",
        "Score = killed / checked (no-tests mutants count as not killed); adjusted = killed / (checked -",
        "survivors judged equivalent) and counts a crashed test run (the process died on a signal) as",
        "detected. After tests/test_mut_<folder>.py was written, `sample.py --recheck`",
        "re-ran that run's survivors on the same commit against the new tests only (a killed mutant stays",
        "killed when tests are added); the first pass is given under each folder.",
        "",
        "| folder | mutants total / checked | killed | survived | no tests | timeouts | crashed | score "
        "| adjusted (95% CI) | equivalent survivors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for folder in ORDER:
        path = RESULTS / f"mutation_{folder}.json"
        if not path.exists():
            out.append(f"| {FOLDER_PATHS.get(folder, f'compress/passes/{folder}/')} | not run | | | | | | | | |")
            continue
        summary = json.loads(path.read_text())
        line, extra = row(summary, equivalent)
        out.append(line)
        notes += [
            "",
            f"## {folder} (commit {summary['commit'][:10]}; {summary['not_sampled']} mutants not sampled)",
            "",
        ]
        first = RESULTS / f"mutation_{folder}_first.json"
        if first.exists():  # the same sample before tests/test_mut_<folder>.py was written
            f = json.loads(first.read_text())
            k = f["killed"] + f["timeout"]
            extra.insert(
                0,
                f"- first pass, before tests/test_mut_{folder}.py: killed {k} / {f['checked']} = "
                f"{k / f['checked']:.1%} ({f['survived']} survived, {f['no_tests']} no tests)",
            )
        notes += extra or ["- every checked mutant was killed"]
        for more_path in sorted(RESULTS.glob(f"mutation_{folder}_more_seed*[0-9].json")):  # another seed's sample
            more = json.loads(more_path.read_text())
            line, extra = row(more, equivalent)
            out.append(line)
            notes += ["", f"- further sample, seed {more['seed']} (commit {more['commit'][:10]}):"]
            first = more_path.with_name(more_path.stem + "_first.json")
            if first.exists():
                f = json.loads(first.read_text())
                k = f["killed"] + f["timeout"]
                extra.insert(
                    0,
                    f"- first pass, before the tests it prompted: killed {k} / {f['checked']} = {k / f['checked']:.1%}",
                )
            notes += ["  " + n for n in extra] or ["  - every checked mutant was killed"]
    (RESULTS / "mutation.md").write_text("\n".join(out + notes) + "\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
