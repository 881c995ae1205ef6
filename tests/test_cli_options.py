"""The shared CLI options: ``--calib`` is a hidden alias of ``--data``; every command's help has an example."""

from __future__ import annotations

import json

import pytest

from squeeze.cli import main as cli_main

TEXTS = "\n".join(
    f"the {w} of the river ran past {n} old stone walls."
    for n, w in enumerate(["water", "colour", "sound", "cold", "edge", "light", "mud", "song"] * 2)
)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _scores(capsys, folder, *data: str) -> dict:
    code, out, err = _run(
        capsys,
        "prune",
        str(folder),
        "--drop-attn",
        "1",
        "--dry-run",
        "--json",
        "--samples",
        "4",
        "--seq-len",
        "16",
        *data,
    )
    assert code == 0, err
    return json.loads(out)["result"]["scores"]


def test_calib_is_data(capsys, tmp_path, tiny_dirs):
    texts = tmp_path / "texts.txt"
    texts.write_text(TEXTS)
    by_data = _scores(capsys, tiny_dirs["llama"], "--data", str(texts))
    by_calib = _scores(capsys, tiny_dirs["llama"], "--calib", str(texts))
    builtin = _scores(capsys, tiny_dirs["llama"])
    assert by_calib == by_data
    assert by_data != builtin  # the file was read (an ignored flag would score the builtin data)
    code, _, err = _run(
        capsys,
        "prune",
        str(tiny_dirs["llama"]),
        "--drop-attn",
        "1",
        "--dry-run",
        "--data",
        "synthetic",
        "--calib",
        str(texts),
    )
    assert code == 2 and "--calib" in err and len(err.strip().splitlines()) == 1


def test_calib_is_hidden(capsys):
    code, out, _ = _run(capsys, "quantize", "--help")
    assert code == 0 and "--data" in out and "--calib" not in out


def _commands() -> list[list[str]]:
    group = cli_main.app
    found = []
    for info in group.registered_commands:
        found.append([info.name])
    for sub in group.registered_groups:
        found += [[sub.name, c.name] for c in sub.typer_instance.registered_commands]
    return found


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_help_has_an_example(capsys, command):
    code, out, _ = _run(capsys, *command, "--help")
    assert code == 0 and "Example: squeeze " + command[0] in " ".join(out.split())
