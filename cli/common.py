"""What every command shares: consoles, progress drawing, data specs, tables (the shared options: options.py)."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
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
HEARTBEAT_S = 0.2  # how often the plain heartbeat looks at the current stage


def _row(label: str) -> str:
    """Labels sharing the part before the first ``:`` share one bar / one clock (an operation's
    stages: ``export: tracing`` then ``export: validating``; a loop's sub-steps)."""
    return label.split(":", 1)[0]


class PlainProgress:
    """A ProgressFn writing plain lines to stderr (logs, CI, pipes): an operation (a row of
    labels) that runs past ``PLAIN_EVERY_S`` gets a line naming its current stage then and every
    ``PLAIN_EVERY_S`` after, and one when it ends; quick ones print nothing (a failing command's
    error stays the only line). Used as a context manager, a heartbeat thread keeps the lines
    coming while a stage runs without calling back (tracing a graph, a forward pass)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current: tuple[str, int, int] | None = None
        self.since = 0.0  # when the current row started or last got a line
        self.start: dict[str, float] = {}
        self.shown: set[str] = set()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __call__(self, label: str, done: int, total: int) -> None:
        now = time.monotonic()
        with self.lock:
            row = _row(label)
            if row not in self.start:
                self.start[row] = self.since = now
            self.current = (label, done, total)
            if bool(total) and done >= total:  # the row ends: a last line if it was shown
                if row in self.shown:
                    self._write(now)
                self.current = None
            elif now - self.since >= PLAIN_EVERY_S:
                self._write(now)

    def _write(self, now: float) -> None:
        assert self.current is not None
        label, done, total = self.current
        row = _row(label)
        self.shown.add(row)
        self.since = now
        count = f" {done}/{total}" if total else ""
        sys.stderr.write(f"{label}{count} ({now - self.start[row]:.0f} s)\n")
        sys.stderr.flush()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            now = time.monotonic()
            with self.lock:
                if self.current is not None and now - self.since >= PLAIN_EVERY_S:
                    self._write(now)

    def __enter__(self) -> PlainProgress:
        self._beat = threading.Thread(target=self._heartbeat, name="squeeze-progress", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()

    def line(self, text: str) -> None:
        """A stage boundary worth a line in any case (a recipe's step starting)."""
        with self.lock:
            self.current = None
            sys.stderr.write(text + "\n")
            sys.stderr.flush()


@contextlib.contextmanager
def progress() -> Iterator[ProgressFn]:
    """A ProgressFn drawing Rich bars on stderr, one per operation (labels before the first ``:``),
    named by its current stage, a spinner where it has no count; plain lines
    (:class:`PlainProgress`, with its heartbeat) when stderr is not a terminal."""
    if not err_console.is_terminal:
        with PlainProgress() as plain:
            yield plain
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
        row = _row(label)
        if row not in tasks:
            tasks[row] = bars.add_task(label, total=total or None)  # no count: an indeterminate bar
        bars.update(tasks[row], description=label, completed=done, total=total or None)

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
