"""Where a recipe's jobs run: in this process one after another (``local``, the default) or as Ray
tasks across a cluster (``ray``, the optional extra ``squeeze[ray]``).

Both run the same function on each job (``pipeline._run_job``); only the dispatch differs.

**Ray.** Each job (a matrix point is a job) is one Ray task with a CPU and memory request. A task
writes its steps straight into the run's output folder, which must be a path every worker sees
(a shared file system). The driver keeps what is local: it plans the steps, holds the output
folder's lock, receives each job's ledger rows as its task finishes and writes the report.

**Caching, resume, failures.** A task plans its job again when it starts (``refresh``): a task
retried after its worker died skips the steps that finished before the crash. A step's folder is
written as a hidden temporary renamed into place, and its completion mark (``step.json``) is
written last, so a worker killed mid-step leaves nothing that counts as a finished step; Ray
retries the task (``max_retries``) and the step runs again. A job whose task still fails (its
retries spent) is recorded as failed with Ray's error, like a job that raised.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from squeeze.compress.errors import SqueezeError

if TYPE_CHECKING:
    from squeeze.compress.pipeline import JobPlan, JobResult, Reporter

EXECUTORS = ("local", "ray")
#: retries of a task whose worker process died (Ray's own default for tasks is 3)
MAX_RETRIES = 3


class Executor(Protocol):
    """Runs the planned jobs of a recipe and returns their results in plan order."""

    def run(
        self, plans: list[JobPlan], out: Path, known: dict[str, Path], rep: Reporter, fresh: bool
    ) -> list[JobResult]: ...


class LocalExecutor:
    """Jobs one after another in this process (steps found finished by an earlier job are copied)."""

    def run(
        self, plans: list[JobPlan], out: Path, known: dict[str, Path], rep: Reporter, fresh: bool
    ) -> list[JobResult]:
        from squeeze.compress.pipeline import _run_job

        results = []
        for n, jp in enumerate(plans):
            rep.job_start(n, len(plans), jp.job)
            result = _run_job(jp, out, known, rep)
            results.append(result)
            rep.job_done(result)
        return results


def refresh(jp: JobPlan, fresh: bool) -> JobPlan:
    """``jp`` with each step's ``done`` read again from its folder (a retried task resumes)."""
    from squeeze.compress.pipeline_steps import read_step

    if fresh:
        return jp
    steps = []
    for s in jp.steps:
        row = read_step(s.folder)
        steps.append(replace(s, done=s.done or (row is not None and row.get("key") == s.key)))
    return replace(jp, steps=steps)


def _job_task(
    jp: JobPlan, out: str, known: dict[str, str], passes: dict[str, type], threads: int, fresh: bool
) -> JobResult:
    """One job on a Ray worker: the driver's passes registered, the driver's torch threads."""
    import torch

    from squeeze.compress.passes import REGISTRY
    from squeeze.compress.pipeline import Reporter, _run_job

    REGISTRY.update(passes)  # passes a driver registered at run time (plugins, tests) exist here too
    torch.set_num_threads(threads)  # the same thread count as a local run: the same float results
    known_paths = {k: Path(v) for k, v in known.items()}
    return _run_job(refresh(jp, fresh), Path(out), known_paths, Reporter())


class RayExecutor:
    """Each job a Ray task; ``address`` is ``auto`` (a running cluster), ``HOST:PORT``, or None (a
    Ray instance started in this process with ``num_cpus``)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        cpus_per_job: float = 1.0,
        memory_mb: int | None = None,
        num_cpus: int | None = None,
        max_retries: int = MAX_RETRIES,
    ):
        if cpus_per_job <= 0:
            raise SqueezeError(f"--cpus-per-job must be > 0, got {cpus_per_job}")
        if importlib.util.find_spec("ray") is None:  # before the output folder is made
            raise SqueezeError("--executor ray needs Ray: pip install 'squeeze[ray]'")
        self.address, self.cpus, self.memory_mb = address, cpus_per_job, memory_mb
        self.num_cpus, self.max_retries = num_cpus, max_retries

    def _ray(self):
        try:
            import ray
        except ImportError:
            raise SqueezeError("--executor ray needs Ray: pip install 'squeeze[ray]'") from None
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address is None:
                kwargs["num_cpus"] = self.num_cpus
            try:
                ray.init(address=self.address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise SqueezeError(f"--executor ray: cannot reach a Ray cluster at {self.address}: {exc}") from None
        return ray

    def run(
        self, plans: list[JobPlan], out: Path, known: dict[str, Path], rep: Reporter, fresh: bool
    ) -> list[JobResult]:
        import torch

        from squeeze.compress.passes import REGISTRY
        from squeeze.compress.pipeline import JobResult

        ray = self._ray()
        options: dict[str, Any] = {"num_cpus": self.cpus, "max_retries": self.max_retries}
        if self.memory_mb:
            options["memory"] = int(self.memory_mb) << 20
        task = ray.remote(_job_task).options(**options)
        out_abs = os.path.abspath(out)
        snapshot = {k: os.path.abspath(v) for k, v in known.items()}
        passes, threads = dict(REGISTRY), torch.get_num_threads()
        refs = {task.remote(jp, out_abs, snapshot, passes, threads, fresh): n for n, jp in enumerate(plans)}
        results: list[JobResult | None] = [None] * len(plans)
        for done, (n, value) in enumerate(self._as_completed(ray, refs)):
            jp = plans[n]
            rep.job_start(done, len(plans), jp.job)
            if isinstance(value, BaseException):  # the task itself failed (its retries spent)
                value = JobResult(
                    job=jp.job.name,
                    model=jp.job.model,
                    point=dict(jp.job.point),
                    status="failed",
                    error=f"ray: {type(value).__name__}: {str(value).splitlines()[0]}",
                    failed_step=0,
                )
            for row in value.rows[1:]:  # the worker's steps, replayed for the progress display
                rep.step_start(jp.job, row["step"], len(jp.steps), row["pass"], bool(row.get("cached")))
                rep.step_done(jp.job, row)
            results[n] = value
            rep.job_done(value)
        return [r for r in results if r is not None]

    @staticmethod
    def _as_completed(ray, refs: dict) -> Iterator[tuple[int, Any]]:
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                yield refs[ready[0]], ray.get(ready[0])
            except Exception as exc:  # a task error or a worker lost for good: that job failed
                yield refs[ready[0]], exc


def make(name: str, address: str | None = None, **kwargs: Any) -> Executor:
    """The executor for ``--executor NAME``."""
    if name == "local":
        if address is not None:
            raise SqueezeError("--address is for --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, **kwargs)
    raise SqueezeError(f"unknown executor {name!r}; choose one of: {', '.join(EXECUTORS)}")
