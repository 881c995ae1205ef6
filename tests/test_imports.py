"""compress/ has no import cycle: every import points down its floors (DESIGN.md section 1).

The graph holds every ``squeeze.*`` import a module can execute, at module level or inside a
function (only ``if TYPE_CHECKING:`` blocks are left out), plus the implicit import of each
parent package (``squeeze.compress.passes.base`` runs ``passes/__init__.py`` first). Late-bound
edges allowed to point up would be listed in :data:`LATE_BOUND` with their reason; there are none.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"compress": "squeeze.compress", "kernels": "squeeze.kernels"}

#: (importer, imported) edges allowed to point up, each with its reason. Empty: ``checkpoint.load``
#: takes the replay of a squeeze folder's edits from its caller (``run.load`` passes the pass
#: registry's ``passes.replay_edit``), so no workshop module imports a pass.
LATE_BOUND: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    out = {}
    for folder, prefix in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, name: str, is_pkg: bool) -> list[str]:
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.extend(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = name if is_pkg else name.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                found.append(base)
                found.extend(f"{base}.{a.name}" for a in child.names)
            visit(child)

    visit(tree)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        own = {".".join(name.split(".")[:i]) for i in range(2, name.count(".") + 1)}  # already running
        for target in _imports(ast.parse(path.read_text()), name, is_pkg):
            # the module itself (when it is one) and every parent package it runs on the way,
            # except the packages this module lives in (their __init__ has started before it)
            parts = target.split(".")
            for i in range(len(parts), 2, -1):
                dep = ".".join(parts[:i])
                if dep in mods and dep != name and dep not in own and (name, dep) not in LATE_BOUND:
                    edges[name].add(dep)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_graph_sees_a_function_level_cycle():
    # what this test would miss if it only read module-level imports
    edges = {"a": {"b"}, "b": set()}
    tree = ast.parse("def f():\n    from squeeze.compress import a\n")
    assert _imports(tree, "squeeze.compress.b", False) == ["squeeze.compress", "squeeze.compress.a"]
    edges["b"].add("a")
    assert find_cycle(edges) == ["a", "b", "a"]


def test_compress_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_workshop_never_imports_a_pass():
    edges = graph()
    floor = ("checkpoint", "folders", "surgery", "capture", "calibration", "evaluate", "errors")
    workshop = [f"squeeze.compress.{m}" for m in floor]
    workshop += [m for m in edges if m.startswith("squeeze.compress.families")]  # the package and its modules
    assert len(workshop) > len(floor) + 1
    for mod in workshop:
        ups = sorted(d for d in edges[mod] if d.startswith(("squeeze.compress.passes", "squeeze.compress.run")))
        assert not ups, f"{mod} imports {ups}"


def test_each_module_imports_alone():
    """Each compress module imported first, from scratch: one interpreter that forgets every
    ``squeeze.compress`` module before each import (the third-party libraries and squeeze.kernels,
    whose torch ops register once per process, stay loaded: only squeeze's own code runs again)."""
    names = sorted(m for m in modules() if m.startswith("squeeze.compress"))
    code = (
        "import importlib, sys\n"
        "bad = []\n"
        "for name in sys.argv[1:]:\n"
        "    for key in [k for k in sys.modules if k == 'squeeze.compress' or k.startswith('squeeze.compress.')]:\n"
        "        del sys.modules[key]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        bad.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(bad))\n"
    )
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", proc.stdout
