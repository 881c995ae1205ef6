"""Where a recipe's jobs run: in this process one after another (``local``, the default) or as Ray
tasks across a cluster (``ray``, the optional extra ``squeeze[ray]``).

Both run the function the pipeline hands them on each job (``pipeline._job``); only the dispatch
differs. This module never imports the pipeline (it sits below it).

**Ray.** Each job (a matrix point is a job) is one Ray task with a CPU and memory request. A task
writes its steps straight into the run's output folder, which must be a path every worker sees
(a shared file system). The driver keeps what is local: it plans the steps, holds the output
folder's lock, receives each job's ledger rows as its task finishes and writes the report.

**Caching, resume, failures.** A task plans its job again when it starts (``pipeline._job``): a task
retried after its worker died skips the steps that finished before the crash. A step's folder is
written as a hidden temporary renamed into place, and its completion mark (``step.json``) is
written last, so a worker killed mid-step leaves nothing that counts as a finished step; Ray
retries the task (``max_retries``) and the step runs again. A job whose task still fails (its
retries spent) is recorded as failed with Ray's error, like a job that raised.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from squeeze.compress.errors import SqueezeError

# The pipeline's types (pipeline.JobPlan, JobResult, Reporter), named here, not imported: the pipeline
# imports this module, and an executor only passes them along.
JobPlan = Any
JobResult = Any
Reporter = Any
#: runs one job: with the driver's reporter here, or None in a worker
JobFn = Callable[[JobPlan, Reporter | None], JobResult]
#: the result of a job whose task failed for good: (plan, error) -> a failed JobResult
LostFn = Callable[[JobPlan, str], JobResult]

EXECUTORS = ("local", "ray")
#: retries of a task whose worker process died (Ray's own default for tasks is 3)
MAX_RETRIES = 3


class Executor(Protocol):
    """Runs the planned jobs of a recipe and returns their results in plan order."""

    #: whether jobs run in other processes (paths must then be absolute, and on shared storage)
    remote: bool

    def run(self, plans: list[JobPlan], job: JobFn, lost: LostFn, rep: Reporter) -> list[JobResult]: ...


class LocalExecutor:
    """Jobs one after another in this process (steps found finished by an earlier job are copied)."""

    remote = False

    def run(self, plans: list[JobPlan], job: JobFn, lost: LostFn, rep: Reporter) -> list[JobResult]:
        results = []
        for n, jp in enumerate(plans):
            rep.job_start(n, len(plans), jp.job)
            result = job(jp, rep)
            results.append(result)
            rep.job_done(result)
        return results


def _job_task(job: JobFn, jp: JobPlan, passes: dict[str, type], threads: int) -> JobResult:
    """One job on a Ray worker: the driver's passes registered, the driver's torch threads."""
    import torch

    from squeeze.compress.passes import REGISTRY

    REGISTRY.update(passes)  # passes a driver registered at run time (plugins, tests) exist here too
    torch.set_num_threads(threads)  # the same thread count as a local run: the same float results
    return job(jp, None)


class RayExecutor:
    """Each job a Ray task; ``address`` is ``auto`` (a running cluster), ``HOST:PORT``, or None (a
    Ray instance started in this process with ``num_cpus``)."""

    remote = True

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

    def run(self, plans: list[JobPlan], job: JobFn, lost: LostFn, rep: Reporter) -> list[JobResult]:
        import torch

        from squeeze.compress.passes import REGISTRY

        ray = self._ray()
        options: dict[str, Any] = {"num_cpus": self.cpus, "max_retries": self.max_retries}
        if self.memory_mb:
            options["memory"] = int(self.memory_mb) << 20
        task = ray.remote(_job_task).options(**options)
        job_ref, passes = ray.put(job), dict(REGISTRY)  # the job function (with the cache index) sent once
        refs = {task.remote(job_ref, jp, passes, torch.get_num_threads()): n for n, jp in enumerate(plans)}
        results: list[JobResult | None] = [None] * len(plans)
        for finished, (n, value) in enumerate(self._as_completed(ray, refs)):
            jp = plans[n]
            rep.job_start(finished, len(plans), jp.job)
            if isinstance(value, BaseException):  # the task itself failed (its retries spent)
                value = lost(jp, f"ray: {type(value).__name__}: {(str(value).splitlines() or [''])[0]}")
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
