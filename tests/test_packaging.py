"""Every package folder is listed in pyproject.toml (a wheel silently drops unlisted ones)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
MAPPING = {"api": "squeeze", "compress": "squeeze.compress", "kernels": "squeeze.kernels", "cli": "squeeze.cli"}


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = set()
    for folder, namespace in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([namespace, *rel.parts]))
    assert found == listed
    for pkg in listed:
        assert (ROOT / cfg["package-dir"][pkg]).is_dir(), pkg


def test_one_console_script():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"squeeze": "squeeze.cli.main:main"}


def test_the_notebook_api_is_the_front_door():
    import squeeze
    from squeeze import apply, export, load
    from squeeze.compress import run

    assert (apply, export, load) == (run.apply, run.export, run.load)
    try:
        squeeze.frobnicate  # noqa: B018
    except AttributeError as exc:
        assert "frobnicate" in str(exc)
    else:
        raise AssertionError("unknown attributes must raise AttributeError")
