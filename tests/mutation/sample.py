"""Mutation testing (mutmut 3) of one algorithm folder, on a copy of the committed tree.

    .venv/bin/python tests/mutation/sample.py prune [--sample 100 --seed 17] [--jobs 1] [--work DIR]

The committed HEAD (`git archive HEAD`; `--worktree` copies the working tree instead) is unpacked
to WORK/squeeze/ (mutmut needs the import name `squeeze` to be a real folder; a sitecustomize
takes the editable install of the checkout off the import path there), so the shared checkout is
never touched. Only the folder's source files are mutated, and each mutant runs only the tests of
the folder that reach the mutated function (`-x`, no random order, one torch thread).

With `--sample N`, mutmut first generates every mutant and maps tests to functions, then checks a
uniform random sample of N mutants drawn with `--seed`; the score is then an estimate, printed
with its Wilson 95% interval. The summary (counts, score, the sampled and the unchecked mutant
names, every survivor) is written to WORK/summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
NOMATCH = "__mutate_generate_only__"

# folder key -> (globs of the files to mutate, the tests that cover them)
FOLDERS: dict[str, tuple[list[str], list[str]]] = {
    "prune": (
        ["compress/passes/prune/*"],
        ["test_prune.py", "test_algo_mutants.py", "test_mut_prune.py"],
    ),
    "quantize": (
        ["compress/passes/quantize/*"],
        [
            "test_quant_algos.py",
            "test_algo_mutants.py",
            "test_gptq.py",
            "test_quant.py",
            "test_quant_names.py",
            "test_mut_quantize.py",
        ],
    ),
    "kernels": (
        ["kernels/*"],
        ["test_kernels.py", "test_quant_algos.py", "test_mut_kernels.py"],
    ),
    "distill": (
        ["compress/passes/distill/*", "compress/distill.py"],
        ["test_distill.py", "test_mut_distill.py"],
    ),
}
for _name in ("merge", "factorize", "reparam", "fuse"):
    FOLDERS[_name] = ([f"compress/passes/{_name}/*"], [f"test_{_name}.py", f"test_mut_{_name}.py"])

# mutmut's exit codes (mutmut/stats.py) -> the columns of the results table
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout"}
STATUS.update({-24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"})
STATUS.update({-11: "crashed", -9: "crashed"})  # the test process died on a signal (segfault / kill)

SITECUSTOMIZE = """import sys  # import squeeze from this copy, not from the editable install of the checkout
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()]
"""


def copy_tree(work: Path, worktree: bool, rev: str = "HEAD") -> str:
    """Unpack HEAD (or the working tree) into WORK/squeeze; return the commit copied."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "squeeze").mkdir(parents=True)
    (work / "site").mkdir()
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", rev], check=True, capture_output=True, text=True
    ).stdout.strip()
    if worktree:
        files = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        for rel in files:
            src = ROOT / rel
            if rel.startswith("build/") or not src.is_file():
                continue
            dst = work / "squeeze" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        head += "+worktree"
    else:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", head], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(work / "squeeze")], input=archive.stdout, check=True)
    (work / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return head


def write_config(work: Path, key: str, new_only: bool = False) -> None:
    globs, tests = FOLDERS[key]
    # and every test file named after the folder (test_factorize_alloc.py, test_prune_*.py, ...)
    tests = tests + sorted(p.name for p in (work / "squeeze" / "tests").glob(f"test_{key}_*.py") if p.name not in tests)
    if new_only:  # a recheck: the other tests already ran against these mutants and passed
        tests = [t for t in tests if t.startswith("test_mut_")]
    present = [f"squeeze/tests/{t}" for t in tests if (work / "squeeze" / "tests" / t).exists()]
    lines = ["[mutmut]", "source_paths=squeeze", "only_mutate=" + "\n    ".join(f"squeeze/{g}" for g in globs)]
    lines.append("pytest_add_cli_args_test_selection=" + "\n    ".join(present))
    lines.append("pytest_add_cli_args=-p no:randomly\n    -p no:cacheprovider\n    -x\n    -q")
    (work / "setup.cfg").write_text("\n".join(lines) + "\n")


def mutmut(work: Path, args: list[str], log: Path) -> int:
    env = dict(os.environ, PYTHONPATH=str(work / "site"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with log.open("a") as out:
        return subprocess.run([str(BIN / "mutmut"), *args], cwd=work, env=env, stdout=out, stderr=out).returncode


def read_results(work: Path) -> dict[str, int | None]:
    codes: dict[str, int | None] = {}
    for meta in sorted((work / "mutants").rglob("*.meta")):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def source_id(key: str, rev: str = "HEAD") -> str:
    """Git ids of the committed files mutated for ``key`` (a recheck needs the same source)."""
    globs = [g.rstrip("*").rstrip("/") for g in FOLDERS[key][0]]
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", *[f"{rev}:{g}" for g in globs]],
        check=True,
        capture_output=True,
        text=True,
    )
    return " ".join(out.stdout.split())


def keep_results(work: Path, killed: set[str]) -> None:
    """Mark ``killed`` as killed (exit code 1) in this run's mutant data."""
    for meta in (work / "mutants").rglob("*.meta"):
        data = json.loads(meta.read_text())
        hits = killed & set(data["exit_code_by_key"])
        if hits:
            data["exit_code_by_key"].update(dict.fromkeys(hits, 1))
            meta.write_text(json.dumps(data))


def restore_unreached(work: Path, todo: set[str], survived: set[str]) -> None:
    """After a recheck with the new tests only: 'no tests' there means the earlier verdict stands."""
    for meta in (work / "mutants").rglob("*.meta"):
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        for name in todo & set(codes):
            if codes[name] in (5, 33, None):
                codes[name] = 0 if name in survived else 33
        meta.write_text(json.dumps(data))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(
    key: str, commit: str, source: str, codes: dict[str, int | None], sample: list[str], seed: int | None
) -> dict:
    statuses = {name: STATUS.get(codes[name], "suspicious") for name in sample}
    counts = Counter(statuses.values())
    checked = len(sample) - counts["not checked"]
    killed = counts["killed"] + counts["timeout"]
    tested = checked - counts["no tests"]
    lo, hi = wilson(killed, checked)
    return {
        "folder": key,
        "commit": commit,
        "mutants_total": len(codes),
        "sampled": len(sample),
        "seed": seed,
        "checked": checked,
        "killed": counts["killed"],
        "timeout": counts["timeout"],
        "survived": counts["survived"],
        "no_tests": counts["no tests"],
        "crashed": counts["crashed"],
        "other": {s: c for s, c in counts.items() if s not in {"killed", "timeout", "survived", "no tests", "crashed"}},
        "score": killed / checked if checked else None,
        "score_ci95": [lo, hi],
        "score_without_no_tests": killed / tested if tested else None,
        "source": source,
        "sample": sorted(sample),
        "killed_mutants": sorted(n for n, s in statuses.items() if s in {"killed", "timeout"}),
        "survivors": sorted(n for n, s in statuses.items() if s == "survived"),
        "no_tests_mutants": sorted(n for n, s in statuses.items() if s == "no tests"),
        "unchecked": sorted(n for n, s in statuses.items() if s == "not checked"),
        "not_sampled": len(codes) - len(sample),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", choices=sorted(FOLDERS))
    parser.add_argument("--sample", type=int, default=0, help="check N mutants drawn at random (0: all)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--jobs", type=int, default=1, help="mutmut children (processes running tests)")
    parser.add_argument("--work", type=Path, default=None, help="default: build/mutate/FOLDER")
    parser.add_argument("--worktree", action="store_true", help="copy the working tree, not HEAD")
    parser.add_argument("--resume", action="store_true", help="reuse WORK's mutants and sample")
    parser.add_argument("--rev", default="HEAD", help="the commit to mutate (default HEAD)")
    parser.add_argument(
        "--recheck",
        type=Path,
        default=None,
        help="a previous summary.json of the same source: keep its killed mutants, run only the new "
        "tests/test_mut_FOLDER.py against the others",
    )
    args = parser.parse_args()
    work = (args.work or ROOT / "build" / "mutate" / args.folder).resolve()
    log = work / "mutmut.log"
    previous = json.loads(args.recheck.read_text()) if args.recheck else None
    if args.resume:
        last = json.loads((work / "summary.json").read_text())
        commit, source = last["commit"], last.get("source") or source_id(args.folder, last["commit"].split("+")[0])
    else:
        rev = previous["commit"].split("+")[0] if previous else args.rev
        commit = copy_tree(work, args.worktree, rev)
        if previous:  # the earlier run's source, with this checkout's committed new tests
            for name in FOLDERS[args.folder][1]:
                if name.startswith("test_mut_"):
                    text = subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:tests/{name}"], capture_output=True)
                    if text.returncode == 0:
                        (work / "squeeze" / "tests" / name).write_bytes(text.stdout)
        source = source_id(args.folder, commit.split("+")[0])
        if previous and previous["source"] != source:
            print("--recheck: the folder's source changed since that run; run it afresh", file=sys.stderr)
            return 1
        write_config(work, args.folder, new_only=previous is not None)
        # generate every mutant and the test->function map; the filter then matches nothing, by design
        mutmut(work, ["run", "--max-children", "1", NOMATCH], log)
    codes = read_results(work)
    if not codes:
        print(f"no mutants generated; see {log}", file=sys.stderr)
        return 1
    names = sorted(codes)
    sample = sorted(random.Random(args.seed).sample(names, args.sample)) if 0 < args.sample < len(names) else names
    seed = args.seed if len(sample) < len(names) else None
    todo = [n for n in sample if codes[n] is None]
    if previous:  # tests were only added: a mutant killed before stays killed; re-run the rest
        sample, seed = previous["sample"], previous["seed"]
        kept = set(previous["killed_mutants"])
        todo = [n for n in sample if n not in kept]
        keep_results(work, kept)
    (work / "summary.json").write_text(
        json.dumps(summarize(args.folder, commit, source, codes, sample, seed), indent=1)
    )
    if todo:
        mutmut(work, ["run", "--max-children", str(args.jobs), *todo], log)
    if previous:  # a mutant the new tests do not reach keeps its earlier verdict
        restore_unreached(work, set(todo), set(previous["survivors"]))
    summary = summarize(args.folder, commit, source, read_results(work), sample, seed)
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lo, hi = summary["score_ci95"]
    score = summary["score"] or 0.0
    print(
        f"{args.folder} @ {commit[:10]}: {summary['checked']}/{summary['mutants_total']} checked "
        f"(sample {summary['sampled']}, seed {seed}): killed {summary['killed']}, timeout {summary['timeout']}, "
        f"survived {summary['survived']}, no tests {summary['no_tests']}; score {score:.1%} "
        f"(95% {lo:.1%}-{hi:.1%}); summary: {work / 'summary.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
