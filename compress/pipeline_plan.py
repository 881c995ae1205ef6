"""The plan of a recipe run and what it reports: the types ``pipeline.py`` (the loop, the cache)
and ``pipeline_steps.py`` (one step) and ``executors.py`` (who runs the jobs) share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squeeze.compress.passes import PassConfig
from squeeze.compress.recipe import JobBase

__all__ = ["JobPlan", "JobResult", "Reporter", "StepPlan"]


class Reporter:
    """What the pipeline tells the outside world; the CLI draws it with Rich. Does nothing here."""

    def job_start(self, index: int, total: int, job: JobBase) -> None: ...

    def step_start(self, job: JobBase, index: int, total: int, name: str, cached: bool) -> None: ...

    def step_done(self, job: JobBase, row: dict[str, Any]) -> None: ...

    def job_done(self, result: JobResult) -> None: ...

    def progress(self, label: str, done: int, total: int) -> None:
        """Inner loops of a pass (PassContext.progress)."""


@dataclass
class StepPlan:
    index: int  # 1-based
    name: str
    config: PassConfig
    key: str
    folder: Path
    done: bool  # a finished folder with this key exists


@dataclass
class JobPlan:
    job: JobBase
    folder: Path
    original_key: str
    steps: list[StepPlan]


@dataclass
class JobResult:
    job: str
    model: str
    point: dict[str, Any]
    status: str  # "ok" | "failed"
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    failed_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "model": self.model,
            "point": self.point,
            "status": self.status,
            "error": self.error,
            "failed_step": self.failed_step,
            "rows": self.rows,
        }
