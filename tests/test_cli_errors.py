"""The CLI's error mapping: every usage mistake is one line on stderr and exit 2, Ctrl-C is 130.

typer vendors its own click; these tests fail if main() maps the wrong exception classes (the
bug that turned every typo into a 40-line traceback).
"""

from __future__ import annotations

import pytest
import typer

from squeeze.cli import main as cli_main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["frobnicate"], "No such command 'frobnicate'"),
        (["inspect"], "Missing argument"),
        (["inspect", "x", "--bogus"], "No such option: --bogus"),
        (["export", "x", "-o", "y.onnx", "--opset", "abc"], "--opset"),
        (["prune", "x", "-o", "y", "--samples", "0"], "--samples"),
        (["inspect", "/nonexistent/model/dir"], "/nonexistent/model/dir"),
    ],
)
def test_usage_errors_are_one_line_exit_2(capsys, argv, needle):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and needle in lines[0]


def test_no_arguments_shows_help_and_exits_2(capsys):
    code, out, err = _run(capsys)
    assert code == 2
    assert "Usage" in out + err and "Traceback" not in out + err


def test_help_exits_0(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "prune" in out


def test_debug_after_the_command_is_accepted_and_shows_the_traceback(capsys):
    from squeeze.compress.errors import SqueezeError

    with pytest.raises(SqueezeError):
        cli_main.main(["inspect", "/nonexistent/model/dir", "--debug"])


def _app_raising(exc: BaseException) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def boom() -> None:
        raise exc

    @app.command()
    def other() -> None:  # two commands so that "boom" is a subcommand
        pass

    return app


def test_ctrl_c_in_a_command_exits_130_with_one_line(capsys, monkeypatch):
    monkeypatch.setattr(cli_main, "app", _app_raising(KeyboardInterrupt()))
    code, _, err = _run(capsys, "boom")
    assert code == 130
    assert err.strip().splitlines() == ["error: interrupted"]


def test_multiline_user_error_is_printed_on_one_line(capsys, monkeypatch):
    from squeeze.compress.errors import SqueezeError

    monkeypatch.setattr(cli_main, "app", _app_raising(SqueezeError("first\nsecond")))
    code, _, err = _run(capsys, "boom")
    assert code == 2
    assert err.strip().splitlines() == ["error: first; second"]


def test_bugs_keep_their_traceback(monkeypatch):
    monkeypatch.setattr(cli_main, "app", _app_raising(ZeroDivisionError("bug")))
    with pytest.raises(ZeroDivisionError):
        cli_main.main(["boom"])
