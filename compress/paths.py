"""Rules for the paths squeeze writes and the files it copies, checked before any work.

* An output must not be, contain or lie inside an input, must not be (or hold) the current folder,
  must have the kind asked for (a folder, or a file) when it exists, and its nearest existing
  parent must accept a new entry (tried, not guessed: ``os.access`` says yes to root everywhere).
* Temporary folders and files are named ``.<name>.tmp-<pid>`` beside the target: hidden, never a
  step name, never holding a completion mark; :func:`sweep_stale` removes the ones whose process is
  gone (a SIGKILL or SIGTERM during a save), so the next run to the same target cleans up.
* Side files copied from a model folder never follow a symlink out of that folder (a ``notes.txt``
  link to a secrets file is refused), and a symlink loop is one line, not a traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from squeeze.compress.errors import SqueezeError

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")
RUN_MARK = ".squeeze-run"  # in a recipe's output folder: squeeze made it, a rerun may write into it
LOCK = ".squeeze.lock"


def absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute and normalised (``.`` and ``..`` folded) without following links."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    *,
    force: bool = False,
    kind: Literal["dir", "file"] = "dir",
) -> Path:
    """Refuse an output path that would destroy an input or fail only after all the work.

    Args:
        out: the folder (``kind="dir"``) or file (``kind="file"``) to write.
        inputs: folders or files read by the command; the output may not be one of them, hold one,
            or lie inside one.
        force: whether an existing output may be replaced.

    Returns:
        The output as an absolute path.
    """
    target = absolute(out)
    _check_not_input(target, out, inputs, kind)
    if target.is_symlink() or target.exists():
        if not force:
            raise SqueezeError(f"{out} already exists; pass --force to overwrite it")
        if kind == "file" and target.is_dir():
            raise SqueezeError(f"{out}: is a folder; name a file to write")
        if kind == "dir" and not target.is_dir():
            raise SqueezeError(f"{out}: is a file; name a folder to write")
    _check_writable(target, out)
    return target


def check_run_output(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), *, force: bool = False
) -> Path:
    """A recipe's output folder: new, empty, or one squeeze made (it holds ``RUN_MARK``); a folder
    with files squeeze did not write needs ``force`` (a rerun must not replace a user's report.md
    or delete their ``tb/07-old``). The other rules of :func:`check_output` apply."""
    target = absolute(out)
    _check_not_input(target, out, inputs, "dir")
    if target.is_symlink() or target.exists():
        if not target.is_dir():
            raise SqueezeError(f"{out}: is a file; name a folder to write")
        own = (target / RUN_MARK).exists() or (target / "report.json").exists()  # or a run from before the mark
        if not own and any(target.iterdir()) and not force:
            raise SqueezeError(
                f"{out} holds files squeeze did not write; name a new folder, or pass --force to run into it"
            )
    else:
        _check_writable(target, out)
    return target


def mark_run_output(target: Path) -> None:
    """Create a recipe's output folder and mark it as squeeze's."""
    target.mkdir(parents=True, exist_ok=True)
    (target / RUN_MARK).touch()


@contextlib.contextmanager
def locked(folder: Path, what: str = "squeeze run") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (a second run on the same ``-o`` refuses with one line
    instead of running every step twice). The kernel drops it when the process dies."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise SqueezeError(
                f"{folder} is in use by another {what} (pid {holder}); wait for it or use another -o"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_not_input(target: Path, out, inputs, kind: str) -> None:
    real = Path(os.path.realpath(target))
    for inp in inputs:
        if inp is None:
            continue
        src = Path(os.path.realpath(absolute(inp)))
        if real == src:
            raise SqueezeError(f"{out}: refusing to overwrite the input {inp}")
        if _inside(src, real):
            raise SqueezeError(f"{out}: refusing to write over a folder that holds the input {inp}")
        if kind == "dir" and _inside(real, src):  # a file beside the weights harms nothing
            raise SqueezeError(f"{out}: refusing to write inside the input {inp}; choose a folder outside it")
    cwd = Path(os.path.realpath(os.getcwd()))
    if _inside(cwd, real):
        raise SqueezeError(f"{out}: refusing to write over the current folder; name a new folder")


def _check_writable(target: Path, shown: str | os.PathLike) -> None:
    parent = target.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link: creating through it would fail later
            raise SqueezeError(f"{shown}: {parent} is a broken symlink")
        parent = parent.parent
    if not parent.is_dir():
        raise SqueezeError(f"{shown}: cannot create it, {parent} is a file")
    try:
        probe = tempfile.mkdtemp(prefix=".squeeze-probe-", dir=parent)
    except OSError as exc:
        raise SqueezeError(f"{shown}: not writable ({parent}: {exc.strerror or exc})") from None
    os.rmdir(probe)


# --------------------------------------------------------------------------------------------
# Temporary siblings
# --------------------------------------------------------------------------------------------


def temp_name(target: Path, what: Literal["tmp", "old"] = "tmp") -> Path:
    """The hidden sibling a write goes through: ``.<name>.tmp-<pid>``."""
    return target.parent / f".{target.name}.{what}-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(target: Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>`` / ``.old-<pid>`` siblings of ``target`` left by dead processes."""
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    for item in target.parent.iterdir():
        m = _TEMP.match(item.name)
        if not m or m["name"] != target.name or _alive(int(m["pid"])):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
        removed.append(item)
    return removed


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While a write is in progress, SIGTERM raises KeyboardInterrupt, so the write's cleanup runs
    (a plain SIGTERM left the hidden temporary checkpoint behind) and the CLI exits 130. Only in
    the main thread, and only where nobody installed a SIGTERM handler of their own."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"terminated (signal {signum})")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def is_temp(name: str) -> bool:
    """Whether a folder entry is one of squeeze's temporary siblings."""
    return _TEMP.match(name) is not None


# --------------------------------------------------------------------------------------------
# Side files of a model folder
# --------------------------------------------------------------------------------------------


def model_root(folder: Path) -> Path:
    """The folder links may point into: the model folder, or a hub cache repo's folder (its
    ``snapshots/<rev>/`` files are links into ``../../blobs``)."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots":
        return real.parent.parent
    return real


def safe_target(item: Path, root: Path) -> Path:
    """Where ``item`` really is; a link loop or a link leaving ``root`` is refused."""
    try:
        real = item.resolve(strict=True)
    except (OSError, RuntimeError):
        raise SqueezeError(f"{item}: broken symlink or symlink loop") from None
    if not _inside(real, root):
        raise SqueezeError(f"{item}: symlink to {real}, outside the model folder; copy the file in instead")
    return real


def side_files(src: Path, skip_names: set[str], skip_suffixes: tuple[str, ...], skip_dir) -> list[tuple[Path, Path]]:
    """(real file, path relative to ``src``) of every side file to copy, links checked."""
    root = model_root(src)
    out: list[tuple[Path, Path]] = []
    seen: set[Path] = set()

    def walk(folder: Path, rel: Path) -> None:
        real_folder = Path(os.path.realpath(folder))
        if real_folder in seen:  # a link back to a folder already walked
            raise SqueezeError(f"{src / rel}: symlink loop")
        seen.add(real_folder)
        for item in sorted(folder.iterdir()):
            if item.name.startswith(".") or (rel == Path() and item.name in skip_names):
                continue
            real = safe_target(item, root) if item.is_symlink() else item
            if real.is_dir():
                if rel == Path() and skip_dir(real):
                    continue
                walk(real, rel / item.name)
            elif real.is_file() and not item.name.endswith(skip_suffixes):
                out.append((real, rel / item.name))

    walk(src, Path())
    return out
