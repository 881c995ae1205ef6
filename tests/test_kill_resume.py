"""`squeeze run` killed (SIGKILL) during each step's save, then rerun: the outputs are
byte-identical to an uninterrupted run, nothing temporary is left, and no job picks up a
half-written step (issue 16, item 2).

The run is forked from the test process (no interpreter start-up per run); the child patches the
write it is to die in and kills itself with SIGKILL, so no ``finally`` or ``except`` runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from squeeze.cli.main import main

# Job "a" exports; job "b" shares a's first two steps, so it copies them from a's folders (the
# cache path a half-written folder used to poison).
RECIPE = """version: 1
defaults:
  calibration: {source: builtin, samples: 8, seq_len: 16, eval_samples: 4}
jobs:
  - name: a
    model: model
    steps:
      - prune: {attn_layers: [1]}
      - quantize: {weights: int8, activations: dynamic}
      - export: {opset: 18, latency: false}  # latency: volatile, and tested in test_reliability.py
  - name: b
    model: model
    steps:
      - prune: {attn_layers: [1]}
      - quantize: {weights: int8, activations: dynamic}
"""
VOLATILE = {"seconds", "peak_mem_mb", "export_seconds", "latency_ms", "pass_seconds", "cached", "latency"}


def _die_on(target, attr: str, nth: int, when=lambda *a, **k: True, before: bool = False):
    """Patch ``target.attr`` to SIGKILL this process on its ``nth`` matching call (after writing
    half the file, or before writing when ``before``)."""
    original = getattr(target, attr)
    seen = [0]

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            seen[0] += 1
            if seen[0] == nth:
                if not before:
                    original(*args, **kwargs)
                    path = Path(str(args[1]))
                    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(target, attr, wrapper)


def _run(argv: list[str], kill=None) -> int:
    """Run the CLI in a forked child; the exit code, or -9 when it was killed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 98
        try:
            if kill is not None:
                kill()
            code = main(argv)
        except BaseException:
            code = 99
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _stages():
    import onnx

    from squeeze.compress import checkpoint, pipeline

    def step_mark(nth):
        return lambda: _die_on(
            pipeline, "write_json", nth, when=lambda p, *a, **k: Path(p).name == "step.json", before=True
        )

    return {
        "prune-save": lambda: _die_on(checkpoint, "save_weights", 1),
        "quantize-save": lambda: _die_on(checkpoint, "save_weights", 2),
        "export-save": lambda: _die_on(onnx, "save", 1),
        "quantize-mark": step_mark(2),  # the folder complete, its completion mark not yet written
    }


def _tree(out: Path) -> dict[str, object]:
    """What must be identical between two runs: file bytes, manifests without measurements."""
    tree: dict[str, object] = {}
    for p in sorted(out.rglob("*")):
        rel = str(p.relative_to(out))
        if p.is_dir() or p.name.startswith("report.") or p.name == ".squeeze.lock":  # the lock holds a pid
            continue
        if p.suffix == ".json":
            tree[rel] = _strip(json.loads(p.read_text().replace(str(out), "OUT")))
        else:
            tree[rel] = p.read_bytes()
    return tree


def _strip(data):
    if isinstance(data, dict):
        return {k: _strip(v) for k, v in data.items() if k not in VOLATILE}
    if isinstance(data, list):
        return [_strip(v) for v in data]
    return data


@pytest.fixture(scope="module")
def workspace(tiny_dirs, tmp_path_factory):
    ws = tmp_path_factory.mktemp("kill")
    shutil.copytree(tiny_dirs["bert"], ws / "model")
    (ws / "r.yaml").write_text(RECIPE)
    return ws


@pytest.fixture(scope="module")
def reference_tree(workspace):
    assert _run(["run", str(workspace / "r.yaml"), "-o", str(workspace / "ref")]) == 0
    return _tree(workspace / "ref")


@pytest.mark.parametrize("stage", ["prune-save", "quantize-save", "export-save", "quantize-mark"])
def test_killed_run_resumes_to_identical_outputs(stage, workspace, reference_tree):
    out = workspace / f"out-{stage}"
    recipe = str(workspace / "r.yaml")
    assert _run(["run", recipe, "-o", str(out)], kill=_stages()[stage]) == -signal.SIGKILL
    if stage.endswith("-save"):  # the kill left a half-written temporary folder behind
        assert [p.name for p in out.rglob(".*tmp-*")]
    assert _run(["run", recipe, "-o", str(out)]) == 0
    assert [p.name for p in out.rglob(".*tmp-*")] == []  # removed by the rerun
    tree = _tree(out)
    assert tree.keys() == reference_tree.keys()
    for rel, want in reference_tree.items():
        assert tree[rel] == want, rel
