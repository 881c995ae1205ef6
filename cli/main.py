"""The one console script: ``squeeze``.

``main()`` maps user errors (SqueezeError, bad options, unknown commands) to one line on stderr
and their exit code (2; 1 for a failed validation; 130 for Ctrl-C); ``--debug`` (anywhere on the
line) shows tracebacks. Bugs keep their traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import pydantic
import typer
from rich.markup import escape
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer.exceptions import TyperException

from squeeze.cli import commands
from squeeze.cli.common import OptionsInvalid, err_console
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


def _one_line(text: str) -> str:
    """Error messages are one line: join a multi-line message with '; '."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _fail(message: str, code: int) -> int:
    err_console.print(f"[red]error:[/red] {escape(_one_line(message))}", soft_wrap=True)
    return code


def _usage_hint(exc: UsageError) -> str:
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else "squeeze"
    return f" (see '{path} --help')"


def _validation_message(exc: pydantic.ValidationError, *, flags: bool = False, command: str = "") -> str:
    """The first error of a validation: ``where: message``; with ``flags``, ``where`` is the CLI flag
    (``--drop-attn: ...``) or the command when the error is about the options together."""
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first["loc"])
    msg = first["msg"]
    if flags:
        msg = msg.removeprefix("Value error, ")
        where = f"--{where.replace('_', '-')}" if where else command
    return f"{where}: {msg}" if where else msg


def main(argv: list[str] | None = None) -> int:
    """Run the app; map what users get wrong to one line and an exit code.

    typer >= 0.29 vendors its own click (``typer._click``) and raises *its* exception classes, not
    the separately installed click's: this mapping is written against typer's classes, and typer is
    pinned to the tested minor range in pyproject.toml (tests/test_cli_errors.py guards it).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:  # --debug is a root option; accept it anywhere on the line
        argv = ["--debug", *(a for a in argv if a != "--debug")]
    _quiet_libraries()
    try:
        rv = app(args=argv, prog_name="squeeze", standalone_mode=False)
    except SqueezeError as exc:
        if debug:
            raise
        return _fail(str(exc), exc.exit_code)
    except OptionsInvalid as exc:  # a pass config built from a command's options: name the flag
        if debug:
            raise
        return _fail(_validation_message(exc.error, flags=True, command=exc.command), 2)
    except pydantic.ValidationError as exc:  # a config built from the user's files (a recipe)
        if debug:
            raise
        return _fail(_validation_message(exc), 2)
    except NoArgsIsHelpError as exc:  # `squeeze` or a group with nothing after it
        text = exc.format_message().rstrip()  # typer has usually drawn the help already
        if text:
            sys.stderr.write(text + "\n")
        return 2
    except UsageError as exc:  # unknown command or option, bad or missing value
        if debug:
            raise
        return _fail(exc.format_message() + _usage_hint(exc), exc.exit_code)
    except TyperException as exc:  # other click-level errors (a file that cannot be opened)
        if debug:
            raise
        return _fail(exc.format_message(), exc.exit_code)
    except typer.Abort:  # EOF at a prompt
        return _fail("aborted", 130)
    except KeyboardInterrupt:  # raised outside the command body (while parsing)
        return _fail("interrupted", 130)
    # typer returns Exit codes in non-standalone mode: 0 for --help, 130 for Ctrl-C in a command
    if rv == 130:
        return _fail("interrupted", 130)
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
