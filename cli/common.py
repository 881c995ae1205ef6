"""What every command shares: consoles, progress drawing, data specs, tables (the shared options: options.py)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from squeeze.compress.calibration import DataSpec
from squeeze.compress.passes.base import ProgressFn
from squeeze.compress.report import fmt_bytes

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def data_spec(calib: str, samples: int, seq_len: int, **extra: Any) -> DataSpec:
    if calib not in ("builtin", "synthetic", "wiki") and not Path(calib).exists():
        from squeeze.compress.errors import SqueezeError

        raise SqueezeError(f"{calib}: no such calibration data (use builtin, synthetic or a path)")
    return DataSpec(source=calib, samples=samples, seq_len=seq_len, **extra)


PLAIN_EVERY_S = 2.0  # plain progress: a stage is shown once it has run this long, then this often


class PlainProgress:
    """A ProgressFn writing plain lines to stderr (logs, CI, pipes): a stage that runs past
    ``PLAIN_EVERY_S`` gets a line then and every ``PLAIN_EVERY_S`` after, and one when it ends;
    quick stages print nothing (a failing command's error stays the only line)."""

    def __init__(self) -> None:
        self.start: dict[str, float] = {}
        self.shown: dict[str, float] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        now = time.monotonic()
        self.start.setdefault(label, now)
        finished = bool(total) and done >= total
        last = self.shown.get(label)
        if last is None and now - self.start[label] < PLAIN_EVERY_S and not (finished and label in self.shown):
            return
        if last is not None and not finished and now - last < PLAIN_EVERY_S:
            return
        self.shown[label] = now
        count = f" {done}/{total}" if total else ""
        sys.stderr.write(f"{label}{count} ({now - self.start[label]:.0f} s)\n")
        sys.stderr.flush()

    def line(self, text: str) -> None:
        """A stage boundary worth a line in any case (a recipe's step starting)."""
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


@contextlib.contextmanager
def progress() -> Iterator[ProgressFn]:
    """A ProgressFn drawing Rich bars on stderr (a spinner where a stage has no count); plain lines
    (:class:`PlainProgress`) when stderr is not a terminal."""
    if not err_console.is_terminal:
        yield PlainProgress()
        return
    bars = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )
    tasks: dict[str, TaskID] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = bars.add_task(label, total=total or None)  # no count: an indeterminate bar
        bars.update(tasks[label], completed=done, total=total or None)

    with bars:
        yield update


class OptionsInvalid(Exception):
    """A pass config built from CLI options did not validate; ``main`` maps it to ``--flag: message``."""

    def __init__(self, error: Any, command: str) -> None:
        super().__init__(str(error))
        self.error, self.command = error, command


def pass_config(config_cls: type, command: str, **kw: Any):
    """Build a pass config from CLI options; a bad value is reported by its flag (``--drop-attn: ...``)."""
    from pydantic import ValidationError

    try:
        return config_cls(**kw)
    except ValidationError as exc:
        raise OptionsInvalid(exc, command) from None


def fmt_num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def report_table(report: dict[str, Any]) -> Table:
    """One pass's ledger row as a two-column table."""
    t = Table(title=f"{report['name']}", show_header=False, title_justify="left")
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("params", f"{report['params_before']:,} -> {report['params_after']:,}")
    t.add_row("bytes", f"{fmt_bytes(report['bytes_before'])} -> {fmt_bytes(report['bytes_after'])}")
    fid = report.get("fidelity") or {}
    if fid:
        t.add_row("fidelity", "  ".join(f"{k}={fmt_num(v)}" for k, v in fid.items()))
    t.add_row("time", f"{report['seconds']:.2f} s, peak {report['peak_mem_mb']:.0f} MB")
    for w in report.get("warnings", []):
        t.add_row("warning", f"[yellow]{w}[/yellow]")
    return t
