"""Run a recipe: jobs in order, each step cached in its own folder, a ledger row per step.

Output folder layout (``OUT``)::

    OUT/<job>/01-prune/          a squeeze checkpoint (checkpoint.save, atomic) + step.json
    OUT/<job>/02-quantize/
    OUT/<job>/03-export/         model.onnx, model.onnx.report.json + step.json
    OUT/<job>/original.json      size and parameter count of the job's input model
    OUT/report.json, report.md, report.png

**Cache.** A step's key is a content hash of its input, its pass and config, the calibration /
evaluation data (``DataSpec.fingerprint()``), the job's seed and the squeeze version. The input of
step 1 is hashed from the model's files (config, weights, manifest; the ``with`` models of a
multi-model pass likewise); the input of step k is step k-1's output, which is a function of
step k-1's key, so the keys chain. ``step.json`` is written last, once the folder is complete:
it is the "finished" mark. A rerun skips every step whose folder holds a ``step.json`` with the
same key; a run killed in the middle therefore resumes after the last finished step, and a
changed config re-runs that step and the ones after it (their inputs changed), never the ones
before. A step whose key was already computed by another job in ``OUT`` is copied, not re-run.
``fresh=True`` ignores the cache.

**Same result after a resume.** Every step reads its input from the previous step's folder,
also in an uninterrupted run, and seeds torch with the job's seed first; so a resumed run and an
uninterrupted one feed each step identical bytes. ``model.safetensors`` and ``config.json`` come
out byte-identical; the manifest differs only in the measured ``seconds`` and ``peak_mem_mb``.

**Ledger.** One row per step: parameters, bytes on disk (weights, or the ONNX file), fidelity
against the job's *original* model on the evaluation data (``fidelity``; ``fidelity_step`` is
against the step's input, as ``run_pass`` measures it), ONNX Runtime latency for an export step,
the step's wall time, the peak memory of the pass. A failing job is recorded with its error and
the next job runs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeeze.compress.calibration import DataSpec
from squeeze.compress.checkpoint import Checkpoint, atomic_dir, resolve, squeeze_version, weight_files
from squeeze.compress.errors import SqueezeError
from squeeze.compress.passes import PassConfig
from squeeze.compress.pipeline_plan import JobPlan, JobResult, Reporter, StepPlan
from squeeze.compress.pipeline_steps import (
    BASELINES_DIR,
    ONNX_NAME,
    STEP_FILE,
    JobState,
    export_step,
    pass_step,
    read_step,
    write_json,
)
from squeeze.compress.recipe import EXPORT, JobBase, Recipe, model_refs
from squeeze.compress.run import load

if TYPE_CHECKING:
    from squeeze.compress.executors import Executor

log = logging.getLogger(__name__)

#: manifest / ledger fields that measure one execution and so differ between two runs
VOLATILE = ("seconds", "peak_mem_mb")
_STEP_DIR = re.compile(r"^\d\d-[A-Za-z0-9_]+$")


class JobsFailed(SqueezeError):
    """Some jobs of a run failed (each is in the report); the others ran. Exit code 1."""

    exit_code = 1


# --------------------------------------------------------------------------------------------
# Keys and plans
# --------------------------------------------------------------------------------------------


_HASHES: dict[tuple[str, float], str] = {}


def content_hash(ref: str) -> str:
    """sha256 of a model's defining files (config, weights, manifest), cached by path and mtime."""
    folder = resolve(ref)
    files = [folder / "config.json"]
    if (folder / "squeeze.json").exists():
        files.append(folder / "squeeze.json")
    files += weight_files(folder)[0]
    stamp = (str(folder.resolve()), max(f.stat().st_mtime for f in files if f.exists()))
    if stamp not in _HASHES:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        _HASHES[stamp] = h.hexdigest()
    return _HASHES[stamp]


def data_spec(job: JobBase) -> DataSpec:
    return job.calibration or DataSpec()


def step_key(input_key: str, name: str, config: PassConfig, job: JobBase) -> str:
    """The content hash that names a step's result."""
    cfg = config.model_dump(mode="json", by_alias=True)
    refs = model_refs(config)
    if refs:  # the other models count by content, not by where they lie
        cfg.pop("others", None)
    payload = {
        "input": input_key,
        "pass": name,
        "config": cfg,
        "with": [content_hash(r) for r in refs],
        "data": data_spec(job).fingerprint(),
        "seed": job.seed,
        "squeeze": squeeze_version(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def plan(recipe: Recipe, out: str | Path, *, fresh: bool = False) -> list[JobPlan]:
    """Each job's steps with their keys and folders, and which are already finished."""
    out = Path(out)
    plans = []
    for job in recipe.jobs:
        folder = out / job.name
        original = content_hash(job.model)
        key, steps = original, []
        for i, step in enumerate(job.steps, 1):
            key = step_key(key, step.pass_name, step.config, job)
            sf = folder / f"{i:02d}-{step.pass_name}"
            row = read_step(sf)
            steps.append(
                StepPlan(
                    i,
                    step.pass_name,
                    step.config,
                    key,
                    sf,
                    done=not fresh and row is not None and row.get("key") == key,
                )
            )
        plans.append(JobPlan(job, folder, original, steps))
    return plans


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run(
    recipe: Recipe,
    out: str | Path,
    *,
    fresh: bool = False,
    reporter: Reporter | None = None,
    executor: Executor | None = None,
) -> list[JobResult]:
    """Run every job of a recipe into ``out``; a failing job is recorded and the others still run.
    ``executor`` dispatches the jobs (compress/executors.py; default: one after another, here)."""
    from squeeze.compress.executors import LocalExecutor

    executor = executor or LocalExecutor()
    out = Path(out).absolute() if executor.remote else Path(out)  # a worker's cwd is not ours
    plans = plan(recipe, out, fresh=fresh)
    known = {} if fresh else _finished_steps(out)
    job = functools.partial(_job, out=out, known=known, fresh=fresh)
    return executor.run(plans, job, _lost, reporter or Reporter())


def _job(jp: JobPlan, rep: Reporter | None, *, out: Path, known: dict[str, Path], fresh: bool) -> JobResult:
    """One job, here (``rep``) or in a worker (None: its task may be a retry, so the job is planned
    again and the steps a dead worker finished are skipped)."""
    if rep is None:
        done = [not fresh and (r := read_step(s.folder)) is not None and r.get("key") == s.key for s in jp.steps]
        jp = dataclasses.replace(jp, steps=[dataclasses.replace(s, done=d) for s, d in zip(jp.steps, done)])
    return _run_job(jp, out, known, rep or Reporter())


def _lost(jp: JobPlan, error: str) -> JobResult:
    """A job whose worker was lost for good (the executor's retries spent)."""
    return JobResult(
        job=jp.job.name, model=jp.job.model, point=dict(jp.job.point), status="failed", error=error, failed_step=0
    )


def _finished_steps(out: Path) -> dict[str, Path]:
    """key -> folder of every finished step already in ``out`` (to copy instead of re-running)."""
    found: dict[str, Path] = {}
    for f in sorted(out.glob(f"*/*/{STEP_FILE}")):
        if not _STEP_DIR.match(f.parent.name) or f.parent.parent.name.startswith("."):
            continue  # a hidden temporary (or a user's folder) is never a finished step
        row = read_step(f.parent)
        if row and "key" in row:
            found.setdefault(row["key"], f.parent)
    return found


def _run_job(jp: JobPlan, out: Path, known: dict[str, Path], rep: Reporter) -> JobResult:
    job = jp.job
    res = JobResult(job=job.name, model=job.model, point=dict(job.point), status="ok")
    state = JobState(jp, rep)
    current: Checkpoint | None = None  # the last step's output, loaded from its folder
    step: StepPlan | None = None
    try:
        res.rows.append(state.original_row())
        for step in jp.steps:
            reuse = None if step.done else _reusable(known.get(step.key), step.key)
            rep.step_start(job, step.index, len(jp.steps), step.name, step.done or reuse is not None)
            if step.done or reuse is not None:
                if reuse is not None:
                    _copy_step(reuse, step.folder)
                row = read_step(step.folder) or {}
                row.update(job=job.name, folder=_rel(step.folder, out), cached=True)
                current = None
            else:
                _ = state.reference  # before any pass runs: a pass may change its input in place
                if current is None:
                    prev = jp.steps[step.index - 2].folder if step.index > 1 else None
                    current = load(prev) if prev is not None else state.load_original()
                start = time.perf_counter()
                if step.name == EXPORT:
                    body = export_step(current, step, state)
                    current = None
                else:
                    body, current = pass_step(current, step, state)
                row = {
                    "job": job.name,
                    "step": step.index,
                    "pass": step.name,
                    **body,
                    "key": step.key,
                    "folder": _rel(step.folder, out),
                    "seconds": round(time.perf_counter() - start, 3),
                    "cached": False,
                }
                write_json(step.folder / STEP_FILE, row)
                known[step.key] = step.folder
            res.rows.append(row)
            rep.step_done(job, row)
        _remove_stale(jp)
    except Exception as exc:  # one failing job must not stop the others
        res.status = "failed"
        res.failed_step = step.index if step is not None else 0
        res.error = str(exc) if isinstance(exc, SqueezeError) else f"{type(exc).__name__}: {exc}"
        log.debug("job %s failed", job.name, exc_info=True)
    return res


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def _reusable(folder: Path | None, key: str) -> Path | None:
    """``folder`` if it still holds the finished step ``key`` (it may have been cleaned up since)."""
    row = read_step(folder) if folder is not None else None
    return folder if row is not None and row.get("key") == key else None


def _copy_step(src: Path, dst: Path) -> None:
    """Another job computed this key: copy its folder (step.json last, so a crash leaves it unfinished)."""
    with atomic_dir(dst, force=True) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(STEP_FILE))
    shutil.copy2(src / STEP_FILE, dst / STEP_FILE)


def _remove_stale(jp: JobPlan) -> None:
    """Drop step folders a changed recipe no longer makes (another index, another pass)."""
    keep = {s.folder.name for s in jp.steps} | {BASELINES_DIR}
    if not jp.folder.is_dir():
        return
    for d in jp.folder.iterdir():
        if not _made_by_squeeze(d):  # a user's tb/07-old is never deleted
            continue
        if d.is_dir() and (_STEP_DIR.match(d.name) or d.name.endswith(".rejected")) and d.name not in keep:
            if d.name.endswith(".rejected") and d.name[: -len(".rejected")] in keep:
                continue
            shutil.rmtree(d, ignore_errors=True)


def _made_by_squeeze(folder: Path) -> bool:
    """A step folder squeeze wrote: it holds a checkpoint manifest, a graph or a step mark."""
    return folder.is_dir() and any(
        (folder / n).exists() for n in (STEP_FILE, "squeeze.json", ONNX_NAME, ONNX_NAME + ".report.json")
    )


def run_inputs(recipe: Recipe) -> list[Path]:
    """The local folders and files a run reads: its output may not be, hold or lie inside one."""
    refs: list[str] = []
    for job in recipe.jobs:
        refs += [job.model, *(str(r) for s in job.steps for r in model_refs(s.config))]
        if job.calibration is not None and job.calibration.source not in ("builtin", "synthetic"):
            refs.append(job.calibration.source)
    return [Path(r) for r in refs if not r.startswith("pkg:") and Path(r).exists()]


def _rel(path: Path, out: Path) -> str:
    try:
        return str(path.relative_to(out))
    except ValueError:
        return str(path)


def strip_volatile(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest without the measurements that differ between two runs (for comparisons)."""
    m = json.loads(json.dumps(manifest))
    for row in m.get("ledger", []):
        for k in VOLATILE:
            row.pop(k, None)
    return m
