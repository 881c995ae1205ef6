"""The tail every training-pass command shares: run the pass through the front door
(``squeeze.compress.run.apply``: checks once, copies the input, measures, saves) under a
progress bar, then print the ledger row (or JSON) and the pass's own summary lines."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from squeeze.cli.common import console, print_json, progress, report_table
from squeeze.compress.calibration import DataSpec
from squeeze.compress.checkpoint import Checkpoint


def run_and_report(
    pass_: Any,
    model: str,
    output: Path,
    spec: DataSpec,
    *,
    force: bool,
    trust_pickle: bool,
    as_json: bool,
    lines: Callable[[dict[str, Any]], list[str]] = lambda report: [],
    dtype: str | None = None,
) -> None:
    """Apply ``pass_`` to ``model``, save to ``output`` (in ``dtype``, default the input's own);
    print the ledger row and ``lines(row)``."""
    from squeeze.compress.run import apply

    with progress() as bar:
        new = apply(
            model, pass_, data=spec, out=output, force=force, trust_pickle=trust_pickle, progress=bar, dtype=dtype
        )
    assert isinstance(new, Checkpoint)  # not a dry run
    report = new.manifest.ledger[-1]
    if as_json:
        print_json({"report": report, "output": str(output)})
        return
    console.print(report_table(report))
    for line in lines(report):
        console.print(line)
    console.print(f"wrote {output}")
