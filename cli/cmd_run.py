"""``squeeze run RECIPE``, ``squeeze recipe check RECIPE`` and ``squeeze report OUT``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from squeeze.cli.common import console, err_console, print_json
from squeeze.cli.options import Json

if TYPE_CHECKING:
    from rich.progress import Progress

recipe_app = typer.Typer(help="Work with recipe files.", no_args_is_help=True)


def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Output folder (default: out/<recipe name>)."),
    job: list[str] | None = typer.Option(
        None, "--job", help="Run only this job (repeatable; a matrix job's name runs all its points)."
    ),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore finished steps and run everything again."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and show which steps would run; run nothing."),
    samples: int | None = typer.Option(
        None, "--samples", min=1, max=100_000, help="Cap calibration/eval samples and training steps (quick runs)."
    ),
    force: bool = typer.Option(False, "--force", help="Run into a folder that holds files squeeze did not write."),
    executor: str = typer.Option(
        "local",
        "--executor",
        help="Where jobs run: local (one after another, here) or ray "
        "(one Ray task per job; -o must be a path every worker sees). Needs squeeze[ray].",
    ),
    address: str | None = typer.Option(
        None, "--address", help="Ray cluster: auto or HOST:PORT (default: start Ray on this machine)."
    ),
    cpus_per_job: float = typer.Option(1.0, "--cpus-per-job", help="Ray: CPUs each job's task asks for."),
    memory_per_job: int | None = typer.Option(
        None, "--memory-per-job", min=1, help="Ray: MB each job's task asks for."
    ),
) -> None:
    """Run a recipe's jobs; finished steps are reused; print the ledger and write the report."""
    from squeeze.compress import executors, pipeline, report
    from squeeze.compress.paths import check_run_output, locked, mark_run_output
    from squeeze.compress.recipe import load_recipe

    full = load_recipe(recipe)
    rec = full.select(job)
    if samples is not None:
        rec = rec.with_samples(samples)
    out = output if output is not None else Path("out") / recipe.stem
    check_run_output(out, pipeline.run_inputs(rec), force=force)  # before any work
    extra = {"cpus_per_job": cpus_per_job, "memory_mb": memory_per_job} if executor == "ray" else {}
    runner = executors.make(executor, address, **extra)
    if dry_run:
        _print_plan(pipeline.plan(rec, out), out)
        return
    mark_run_output(out)
    with locked(out):  # a second run on the same -o refuses instead of running every step twice
        with _RichReporter() as rep:
            results = pipeline.run(rec, out, fresh=fresh, reporter=rep, executor=runner)
        data = report.build(results, out, str(recipe), [j.name for j in full.jobs])
        paths = report.write(data, out)
    print_ledger(data)
    console.print(f"report: {paths['md']}  {paths['json']}  {paths['png']}")
    failed = [r for r in results if r.status != "ok"]
    for r in failed:
        err_console.print(f"[red]failed:[/red] job {r.job}, step {r.failed_step}: {r.error}", soft_wrap=True)
    if failed:
        raise pipeline.JobsFailed(f"{len(failed)} of {len(results)} job(s) failed: {', '.join(r.job for r in failed)}")


def check(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    as_json: Json = False,
) -> None:
    """Validate a recipe (schema, cross-step rules, model references) and print the resolved plan."""
    from squeeze.compress.recipe import load_recipe

    rec = load_recipe(recipe)
    if as_json:
        print_json(rec.dump())
        return
    console.print(rec.to_yaml(), end="", markup=False, soft_wrap=True)
    steps = sum(len(j.steps) for j in rec.jobs)
    console.print(f"[green]ok[/green]: {recipe}: {len(rec.jobs)} job(s), {steps} step(s)")


def show_report(
    out: Path = typer.Argument(..., help="The output folder of a `squeeze run`."),
    as_json: Json = False,
) -> None:
    """Print the ledger of a finished run again."""
    from squeeze.compress import report

    data = report.read(out)
    if as_json:
        print_json(data)
        return
    print_ledger(data)
    for j in data["jobs"]:
        if j["status"] != "ok":
            err_console.print(
                f"[red]failed:[/red] job {j['job']}, step {j.get('failed_step')}: {j.get('error')}", soft_wrap=True
            )


def print_ledger(data: dict[str, Any]) -> None:
    # a file or a pipe gets the whole table at its natural width rather than wrapped cells
    if console.is_terminal:
        console.print(ledger(data))
    else:
        from rich.console import Console

        Console(highlight=False, width=200).print(ledger(data))


def ledger(data: dict[str, Any]) -> Table:
    """The ledger as a Rich table (the same cells as report.md)."""
    from squeeze.compress.report import ledger_table

    cols, cells = ledger_table(data)
    t = Table(
        title="ledger: cos = cosine vs the job's original model (mean, worst); ORT ms = ONNX Runtime latency",
        title_justify="left",
    )
    for c in cols:
        t.add_column(c, justify="right" if c not in ("job", "step", "") else "left", overflow="fold")
    for row in cells:
        style = "red" if row[1].endswith("FAILED") else None
        t.add_row(*row, style=style)
    return t


def _print_plan(plans: list, out: Path) -> None:
    t = Table(title=f"plan (output: {out})", title_justify="left")
    for c in ("job", "step", "key", "folder", "status"):
        t.add_column(c)
    for jp in plans:
        for s in jp.steps:
            folder = s.folder.relative_to(out) if s.folder.is_relative_to(out) else s.folder
            t.add_row(
                jp.job.name,
                f"{s.index} {s.name}",
                s.key[:12],
                str(folder),
                "cached" if s.done else "[yellow]run[/yellow]",
            )
    console.print(t)


class _RichReporter:
    """Progress bars for jobs, steps and a pass's inner loops; silent when stdout is not a terminal."""

    def __init__(self) -> None:
        from squeeze.cli.common import PlainProgress

        self.live = console.is_terminal
        self.bars: Progress | None = None
        self.plain = None if self.live else PlainProgress()  # logs and CI: plain lines on stderr

    def __enter__(self) -> _RichReporter:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self.bars.__enter__()
            self.jobs = self.bars.add_task("jobs", total=1)
            self.steps = self.bars.add_task("steps", total=1)
            self.inner = self.bars.add_task("", total=1, visible=False)
            self.inner_label = ""
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bars is not None:
            self.bars.__exit__(*exc)

    def job_start(self, index: int, total: int, job) -> None:
        if self.bars is not None:
            self.bars.update(self.jobs, description=f"job {job.name}", completed=index, total=total)
            self.bars.update(self.steps, completed=0, total=len(job.steps))

    def step_start(self, job, index: int, total: int, name: str, cached: bool) -> None:
        if self.plain is not None:
            self.plain.line(f"job {job.name}: step {index}/{total} {name}{' (cached)' if cached else ''}")
        if self.bars is not None:
            self.bars.update(self.steps, description=f"step {name}", completed=index - 1, total=total)
            self.bars.update(self.inner, visible=False)

    def step_done(self, job, row: dict[str, Any]) -> None:
        if self.bars is not None:
            self.bars.update(self.steps, completed=row["step"])
            fid = (row.get("fidelity") or {}).get("cos_mean")
            note = "cached" if row.get("cached") else f"{row.get('seconds', 0):.1f} s"
            console.print(
                f"  {job.name} {row['step']:>2} {row['pass']:<10} {'' if fid is None else f'cos {fid:.4f}  '}{note}"
            )

    def job_done(self, result) -> None:
        if self.bars is not None:
            self.bars.advance(self.jobs)
            if result.status != "ok":
                console.print(f"  [red]{result.job} failed at step {result.failed_step}[/red]: {result.error}")

    def progress(self, label: str, done: int, total: int) -> None:
        if self.plain is not None:
            self.plain(f"  {label}", done, total)
        if self.bars is not None:
            self.bars.update(self.inner, description=f"  {label}", completed=done, total=total, visible=True)


def register(app: typer.Typer) -> None:
    app.command("run", epilog="Example: squeeze run recipe.yaml -o out/demo")(run)
    recipe_app.command("check", epilog="Example: squeeze recipe check recipe.yaml")(check)
    app.add_typer(recipe_app, name="recipe")
    app.command("report", epilog="Example: squeeze report out/demo")(show_report)
