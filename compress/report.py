"""The run report: ``report.json``, ``report.md`` and ``report.png`` in a run's output folder.

The terminal table (cli/cmd_run.py) and ``report.md`` are drawn from the same formatted cells
(:func:`ledger_table`), so the files hold exactly the numbers the terminal printed.
A rerun with ``--job`` replaces the entries of the jobs it ran and keeps the others.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from squeeze.compress.checkpoint import atomic_file, squeeze_version
from squeeze.compress.errors import SqueezeError

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
log = logging.getLogger(__name__)


def build(results: list, out: Path, recipe_path: str | None, order: list[str]) -> dict[str, Any]:
    """The report of this run merged with the previous one (jobs of the recipe only, in its order)."""
    jobs = {r.job: r.to_dict() for r in results}
    try:
        previous = read(out)
    except SqueezeError as exc:  # a corrupt report must not break every later run: rebuilt from this run
        if (Path(out) / REPORT_JSON).exists():
            log.warning("%s; it is replaced by this run's report", exc)
        previous = {}
    for entry in previous.get("jobs", []):
        if entry["job"] in order and entry["job"] not in jobs:
            jobs[entry["job"]] = entry
    return {
        "format": 1,
        "squeeze_version": squeeze_version(),
        "recipe": recipe_path,
        "jobs": [jobs[name] for name in order if name in jobs],
    }


def write(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write the JSON, the markdown table and the plot; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / REPORT_JSON, "md": out / REPORT_MD, "png": out / REPORT_PNG}
    with atomic_file(paths["json"], force=True) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    with atomic_file(paths["md"], force=True) as tmp:
        tmp.write_text(markdown(report))
    with atomic_file(paths["png"], force=True) as tmp:
        plot(report, tmp)
    return paths


def read(out: str | Path) -> dict[str, Any]:
    path = Path(out) / REPORT_JSON
    if not path.exists():
        raise SqueezeError(f"{out}: no {REPORT_JSON} here (run `squeeze run RECIPE -o {out}` first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SqueezeError(f"{path}: not a readable report ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != 1 or not isinstance(data.get("jobs"), list):
        raise SqueezeError(f"{path}: not a squeeze report")
    for i, job in enumerate(data["jobs"]):  # every field the table and the merge read, checked here
        problem = _job_problem(job)
        if problem:
            raise SqueezeError(f"{path}: not a squeeze report (jobs[{i}]: {problem})")
    return data


def _job_problem(job: Any) -> str | None:
    if not isinstance(job, dict):
        return "not an object"
    if not isinstance(job.get("job"), str) or not isinstance(job.get("status"), str):
        return "needs a job name and a status"
    if not isinstance(job.get("rows"), list):
        return "needs a list of rows"
    for row in job["rows"]:
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or not isinstance(row.get("pass"), str):
            return "a row needs an integer step and a pass name"
        if not isinstance(row.get("params"), int) or not isinstance(row.get("fidelity") or {}, dict):
            return "a row needs params and a fidelity object"
        for key in ("bytes", "latency_ms", "seconds", "peak_mem_mb"):
            if row.get(key) is not None and not isinstance(row[key], (int, float)):
                return f"{key} must be a number"
    return None


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
    """Bytes as B / KB / MB / GB with one decimal."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _f(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def ledger_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Column names and formatted cells: one row per step of every job."""
    rows_in = [r for j in report["jobs"] for r in j["rows"]]
    extra = [k for k in ("top1", "ppl") if any(k in (r.get("fidelity") or {}) for r in rows_in)]
    ratio = any(r.get("latency_ratio") is not None for r in rows_in)
    cols = [
        "job",
        "step",
        "params",
        "size",
        "cos",
        "cos min",
        *extra,
        "ORT ms",
        *(["vs fp32"] if ratio else []),
        "seconds",
        "peak MB",
        "",
    ]
    cells = []
    for j in report["jobs"]:
        for r in j["rows"]:
            fid = r.get("fidelity") or {}
            ref = r["step"] == 0
            cells.append(
                [
                    j["job"],
                    f"{r['step']} {r['pass']}",
                    f"{r['params']:,}",
                    fmt_bytes(r.get("bytes")),
                    "1 (ref)" if ref else _f(fid.get("cos_mean"), ".4f"),
                    "1 (ref)" if ref else _f(fid.get("cos_worst"), ".4f"),
                    *[("-" if ref else _f(fid.get(k), ".4g")) for k in extra],
                    _f(r.get("latency_ms"), ".2f"),
                    *([_ratio(r)] if ratio else []),
                    _f(r.get("seconds"), ".1f"),
                    _f(r.get("peak_mem_mb"), ".0f"),
                    "cached" if r.get("cached") else "",
                ]
            )
        if j["status"] != "ok":
            error = " ".join((j.get("error") or "").split())
            cells.append(
                [
                    j["job"],
                    f"{j.get('failed_step')} FAILED",
                    *[""] * (len(cols) - 3),
                    error if len(error) <= 70 else error[:67] + "...",
                ]
            )  # in full below the table
    return cols, cells


def _ratio(row: dict[str, Any]) -> str:
    """``0.52x (0.50-0.55)``: latency over the job's fp32 graph, interleaved rounds' median and IQR."""
    r = row.get("latency_ratio")
    if r is None:
        return "-"
    lo, hi = (row.get("ratio_spread") or [r, r])[:2]
    return f"{r:.2f}x ({lo:.2f}-{hi:.2f})"


def markdown(report: dict[str, Any]) -> str:
    cols, cells = ledger_table(report)
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [
        f"# squeeze run: {report.get('recipe') or ''}".rstrip(),
        "",
        "cos / cos min: mean and worst cosine similarity against each job's original model on the "
        "held-apart evaluation data (top1: agreement of the argmax; ppl: perplexity, where the model "
        "has logits). ORT ms: ONNX Runtime CPU latency, for the steps that exported; vs fp32: that latency over "
        "the job's fp32 graph's, timed in alternating rounds in a fresh process (median, interquartile range). "
        "Full numbers: report.json.",
        "",
        "| " + " | ".join(c or "note" for c in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
    refs = [(n, r) for n, r in _baselines(report) if r.get("latency_ratio") is not None]
    if refs:  # the reference graphs the export steps were timed against (compress/baselines.py)
        lines += [
            "",
            "Reference graphs: "
            + "; ".join(
                f"{n}: {fmt_bytes(r.get('bytes'))}, cos {_f(r.get('cos'), '.4f')}, {_ratio(r)} vs fp32" for n, r in refs
            )
            + ".",
        ]
    failed = [j for j in report["jobs"] if j["status"] != "ok"]
    if failed:
        lines += ["", "## Failed jobs", ""] + [
            f"- {j['job']} (step {j.get('failed_step')}): {esc(j.get('error'))}" for j in failed
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The plot
# --------------------------------------------------------------------------------------------


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (smaller x, larger y), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _baselines(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Reference points: the original (fp32) model, and the baselines export steps measured
    (compress/baselines.py: the fp32 graph, ORT's dynamic int8) or ``report["baselines"]`` holds;
    without measured ones, an export straight from the original stands for the fp32 graph. One
    point per name, suffixed with the job only where jobs start from different models."""
    found: list[tuple[str, str, dict[str, Any]]] = []  # (name, job, row)
    for job in report["jobs"]:
        rows = {r["step"]: r for r in job["rows"]}
        if 0 in rows:
            found.append(("fp32 (original)", job["job"], {**rows[0], "cos": 1.0}))
        for r in job["rows"]:  # an export step records its job's baselines
            for name, row in (r.get("baselines") or {}).items():
                found.append((name, job["job"], row))
    found += [(name, "", row) for name, row in (report.get("baselines") or {}).items() if isinstance(row, dict)]
    if not any(name == "fp32 ONNX" for name, _, _ in found):
        for job in report["jobs"]:
            first = next((r for r in job["rows"] if r["step"] == 1), None)
            if first and first["pass"] == "export" and first.get("latency_ms"):
                found.append(("fp32 ONNX", job["job"], first))
    out: list[tuple[str, dict[str, Any]]] = []
    for name, job, row in found:
        same = [r for n, _, r in found if n == name]
        distinct = len({r.get("bytes") for r in same}) > 1
        label = f"{name} ({job})" if distinct and job else name
        if any(lbl == label for lbl, _ in out):
            continue
        cos = row.get("cos", (row.get("fidelity") or {}).get("cos_mean", row.get("cos_mean")))
        out.append((label, {**row, "cos": cos}))
    return out


def loss_curves(report: dict[str, Any]) -> list[tuple[str, int, list[float], list[float]]]:
    """``(label, job index, steps, losses)`` of every ledger row whose metrics hold a loss curve."""
    out = []
    for n, job in enumerate(report["jobs"]):
        for r in job["rows"]:
            curve = (r.get("metrics") or {}).get("loss_curve") if isinstance(r.get("metrics"), dict) else None
            if isinstance(curve, list) and curve and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in curve):
                xs, ys = [float(p[0]) for p in curve], [float(p[1]) for p in curve]
                out.append((f"{job['job']}: {r['step']} {r['pass']}", n, xs, ys))
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    """Fidelity (mean cosine vs the original) against latency and against size: a marker per
    step, a line per job, the Pareto front dashed, baselines as black stars; labels only on the
    front (the rest are in the legend and the table), the legend outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for j in report["jobs"] for r in j["rows"]]
    curves = loss_curves(report)
    fig, axes = plt.subplots(1, 3 if curves else 2, figsize=(19 if curves else 13, 5))
    ax_lat, ax_size = axes[0], axes[1]
    if curves:  # training steps (distill, and the passes that train through it): their loss curves
        for label, n, xs, ys in curves:
            axes[2].plot(xs, ys, color=f"C{n % 10}", label=label)
        axes[2].set(xlabel="training step", ylabel="loss", yscale="log", title="training loss")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=8)
    lat_key = "latency_ratio" if any(r.get("latency_ratio") is not None for r in rows) else "latency_ms"
    panels = ((ax_lat, lat_key, 1.0), (ax_size, "bytes", 1 / 2**20))
    for ax, key, scale in panels:
        pts: list[tuple[float, float, str]] = []
        for n, job in enumerate(report["jobs"]):
            series = []
            for r in job["rows"]:
                cos = 1.0 if r["step"] == 0 else (r.get("fidelity") or {}).get("cos_mean")
                if cos is not None and r.get(key):
                    series.append((r[key] * scale, cos, f"{job['job']}: {r['step']} {r['pass']}"))
                    if key == "latency_ratio" and r.get("ratio_spread"):  # the spread of the interleaved rounds
                        lo, hi = r["ratio_spread"]
                        ax.errorbar(r[key], cos, xerr=[[r[key] - lo], [hi - r[key]]], color=f"C{n % 10}", lw=1)
            if series:
                ax.plot(
                    [x for x, _, _ in series],
                    [y for _, y, _ in series],
                    "-o",
                    color=f"C{n % 10}",
                    alpha=0.7,
                    markersize=5,
                    label=job["job"],
                )
                pts += series
        marked = []
        for (name, row), marker in zip(_baselines(report), "*DPXhv^<>", strict=False):  # in the legend, not on the plot
            if row.get(key) and row.get("cos") is not None:
                if key == "latency_ratio" and row.get("ratio_spread"):
                    lo, hi = row["ratio_spread"]
                    ax.errorbar(row[key], row["cos"], xerr=[[row[key] - lo], [hi - row[key]]], color="black", lw=1)
                ax.plot(
                    row[key] * scale,
                    row["cos"],
                    marker,
                    color="black",
                    markersize=11 if marker == "*" else 8,
                    zorder=5,
                    linestyle="none",
                    label=name,
                )
                marked.append((row[key] * scale, row["cos"]))
        front = [pts[i] for i in pareto([(x, y) for x, y, _ in pts])]
        span = max([x for x, _, _ in pts] + [x for x, _ in marked] + [1e-9])
        front_labels = [
            p for p in front if not any(abs(p[0] - x) < 0.03 * span and abs(p[1] - y) < 1e-4 for x, y in marked)
        ]
        if len(front) > 1:
            ax.step(
                [x for x, _, _ in front],
                [y for _, y, _ in front],
                "--",
                where="post",
                color="grey",
                lw=1,
                label="Pareto front",
            )
        for k, (x, y, label) in enumerate(front_labels):  # alternate sides so neighbours do not overlap
            ax.annotate(
                label,
                (x, y),
                textcoords="offset points",
                xytext=(6, 8 if k % 2 == 0 else -14),
                fontsize=8,
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
            )
        if not pts:
            ax.text(
                0.5,
                0.5,
                "no step exported" if key == "latency_ms" else "no sizes",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        ax.grid(alpha=0.3)
    xlabel = (
        "latency / the fp32 graph's (interleaved rounds: median, bars IQR; lower is better)"
        if lat_key == "latency_ratio"
        else "ONNX Runtime latency (ms, lower is better)"
    )
    ax_lat.set(xlabel=xlabel, ylabel="cosine vs original (mean, higher is better)", title="fidelity vs latency")
    ax_size.set(xlabel="size on disk (MB, lower is better)", title="fidelity vs size")
    legend: dict[str, Any] = {}
    for ax in (ax_size, ax_lat):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(
            list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False
        )
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
