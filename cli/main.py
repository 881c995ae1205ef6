"""The one console script: ``squeeze``.

``main()`` maps user errors (SqueezeError, bad options) to one line on stderr and their exit
code (2; 1 for a failed validation); ``--debug`` shows tracebacks. Bugs keep their traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import click
import pydantic
import typer

from squeeze.cli import commands
from squeeze.cli.common import err_console
from squeeze.compress.errors import SqueezeError

app = typer.Typer(
    name="squeeze",
    help="Compress transformer checkpoints and export validated ONNX graphs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # a traceback must never dump tensors
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show info logs."),
) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


# Each command module registers its commands; adding a command is one line here.
for module in commands.MODULES:
    module.register(app)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _quiet_libraries()
    try:
        app(args=argv, prog_name="squeeze", standalone_mode=False)
    except SqueezeError as exc:
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return exc.exit_code
    except pydantic.ValidationError as exc:  # a config built from the user's options
        if debug:
            raise
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        err_console.print(f"[red]error:[/red] {where}: {first['msg']}", soft_wrap=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    except click.ClickException as exc:
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {exc.format_message()}", soft_wrap=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
