"""YAML loading that remembers where each value was written, so errors can name the line.

PyYAML composes a node tree with start marks; we build plain Python data from it ourselves
(safe scalars only, via the SafeLoader's constructors) and keep ``path -> line`` on the side.
A mapping entry's line is its key's line; a list item's line is the item's first line.
Also here: ``defaults`` merged under each job and a matrix's points substituted into it.
Duplicate keys are errors (PyYAML would silently keep the last one, hiding a typo).

A recipe is a file from anywhere, so loading it is bounded: its size (``MAX_BYTES``), the values
it expands to through aliases (``MAX_VALUES``: a "billion laughs" recipe grew ``recipe check`` to
5 GB), its nesting, and the jobs its matrices fan out to (``MAX_JOBS``: each matrix list is capped
by the schema, their product was not). NaN and infinity are refused where they are written.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic_core import ErrorDetails
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from squeeze.compress.errors import SqueezeError

Path_ = tuple  # a location: ("jobs", 1, "steps", 0, "prune", "drop_attn")
MAX_ERRORS = 12
MAX_BYTES = 1 << 20  # the largest recipe in recipes/ is ~3 KB
MAX_VALUES = 100_000  # values built, aliases expanded; a 1000-point sweep recipe builds ~20k
MAX_JOBS = 1000  # jobs after matrix expansion, over the whole recipe


class Positions:
    """Line numbers (1-based) of the values in a YAML document, by location."""

    def __init__(self) -> None:
        self.lines: dict[Path_, int] = {}
        self.budget = MAX_VALUES  # values left to build (aliases expand)

    def line(self, loc: Path_) -> int | None:
        """The line of ``loc``, or of its deepest written ancestor."""
        for n in range(len(loc), -1, -1):
            if tuple(loc[:n]) in self.lines:
                return self.lines[tuple(loc[:n])]
        return None


def fmt_path(loc: Path_) -> str:
    """``("jobs", 1, "steps", 0, "prune", "x")`` -> ``jobs[1].steps[0].prune.x``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def compose(text: str, filename: str = "<recipe>") -> tuple[Any, Positions]:
    """Parse YAML text into plain data plus the line of every value."""
    if len(text) > MAX_BYTES:
        raise SqueezeError(f"{filename}: {len(text):,} characters; a recipe is at most {MAX_BYTES:,}")
    loader = yaml.SafeLoader(text)
    pos = Positions()
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = f":{mark.line + 1}" if mark else ""
            raise SqueezeError(f"{filename}{line}: invalid YAML: {exc.problem or exc}") from None
        except yaml.YAMLError as exc:
            raise SqueezeError(f"{filename}: invalid YAML: {exc}") from None
        if root is None:
            raise SqueezeError(f"{filename}: the recipe is empty")
        pos.lines[()] = root.start_mark.line + 1
        data = _build(loader, root, (), pos, filename, 0)
        check_jobs(data, pos, filename)
        return data, pos
    finally:
        loader.dispose()


def check_jobs(data: Any, pos: Positions, filename: str) -> None:
    """Refuse a recipe whose matrices multiply out to more than ``MAX_JOBS`` jobs."""
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        return  # the schema reports it
    default = (data.get("defaults") or {}).get("matrix") if isinstance(data.get("defaults"), dict) else None
    total = 0
    for i, job in enumerate(data["jobs"]):
        matrix = job.get("matrix", default) if isinstance(job, dict) else None
        points = 1
        if isinstance(matrix, dict):
            for values in matrix.values():
                points *= len(values) if isinstance(values, list) and values else 1
        total += points
        if total > MAX_JOBS:
            line = pos.line(("jobs", i, "matrix"))
            where = f"{filename}:{line}" if line else filename
            raise SqueezeError(
                f"{where}: {fmt_path(('jobs', i, 'matrix'))}: the matrices expand to more than "
                f"{MAX_JOBS} jobs ({points:,} in this one); split the sweep"
            )


def _build(loader: yaml.SafeLoader, node, path: Path_, pos: Positions, filename: str, depth: int) -> Any:
    if depth > 64:
        raise SqueezeError(f"{filename}:{node.start_mark.line + 1}: nesting too deep (recursive alias?)")
    pos.budget -= 1
    if pos.budget < 0:
        raise SqueezeError(
            f"{filename}:{node.start_mark.line + 1}: the recipe expands to more than "
            f"{MAX_VALUES:,} values (aliases of aliases?)"
        )
    if isinstance(node, MappingNode):
        loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise SqueezeError(f"{filename}:{key_node.start_mark.line + 1}: a key must be a plain value")
            try:
                key = loader.construct_object(key_node, deep=True)
            except yaml.YAMLError as exc:
                raise SqueezeError(f"{filename}:{key_node.start_mark.line + 1}: invalid key ({exc})") from None
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise SqueezeError(f"{filename}:{key_node.start_mark.line + 1}: a key must be a plain value")
            if key in out:
                raise SqueezeError(f"{filename}:{key_node.start_mark.line + 1}: duplicate key {key!r}")
            pos.lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _build(loader, value_node, (*path, key), pos, filename, depth + 1)
        return out
    if isinstance(node, SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            pos.lines[(*path, i)] = item.start_mark.line + 1
            items.append(_build(loader, item, (*path, i), pos, filename, depth + 1))
        return items
    assert isinstance(node, ScalarNode)
    try:
        value = loader.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise SqueezeError(f"{filename}:{node.start_mark.line + 1}: invalid value ({exc})") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise SqueezeError(
            f"{filename}:{node.start_mark.line + 1}: {fmt_path(path)}: {node.value} is not a finite number"
        )
    return value


# --------------------------------------------------------------------------------------------
# Errors that name the file, the line and the location
# --------------------------------------------------------------------------------------------


@dataclass
class Source:
    """Where a resolved job's values were written: the job itself, else defaults."""

    index: int
    job: dict
    defaults: dict

    def loc(self, loc: tuple) -> tuple:
        if has_path(self.job, loc) or (
            not has_path(self.defaults, loc) and path_depth(self.job, loc) >= path_depth(self.defaults, loc)
        ):
            return ("jobs", self.index, *loc)
        return ("defaults", *loc)


def has_path(data: Any, loc: tuple) -> bool:
    return path_depth(data, loc) == len(loc)


def path_depth(data: Any, loc: tuple) -> int:
    for d, key in enumerate(loc):
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data):
            data = data[key]
        elif isinstance(data, dict) and len(data) == 1 and key in (next(iter(data)),):
            data = data[key]
        else:
            return d
    return len(loc)


def clean_loc(loc: tuple) -> tuple:
    """Drop the discriminator tag pydantic repeats: steps.0.prune.prune.x -> steps.0.prune.x."""
    out: list = []
    for part in loc:
        if out and isinstance(part, str) and part == out[-1] and len(out) >= 2 and out[-3:-2] == ["steps"]:
            continue
        out.append(part)
    return tuple(out)


class Errors:
    """Problems found so far; one matrix point's problem names the point, a shared one does not."""

    def __init__(self, filename: str, pos: Positions):
        self.filename, self.pos = filename, pos
        self.found: dict[tuple[str, str], list[str]] = {}

    def add(self, loc: tuple, message: str, point: dict | None = None) -> None:
        loc = tuple(loc)
        line = self.pos.line(loc)
        where = f"{self.filename}:{line}" if line else self.filename
        points = self.found.setdefault((f"{where}: {fmt_path(loc)}", message), [])
        if point:
            points.append(", ".join(f"{k}={v}" for k, v in point.items()))

    @property
    def items(self) -> list[str]:
        return [f"{head}{f' [{pts[0]}]' if len(pts) == 1 else ''}: {msg}" for (head, msg), pts in self.found.items()]

    def raise_if_any(self) -> None:
        if not self.found:
            return
        if len(self.items) == 1:
            raise SqueezeError(self.items[0])
        shown = self.items[:MAX_ERRORS]
        more = f"\n  ... and {len(self.items) - MAX_ERRORS} more" if len(self.items) > MAX_ERRORS else ""
        raise SqueezeError(f"{len(self.items)} problems in the recipe:\n  " + "\n  ".join(shown) + more)


# --------------------------------------------------------------------------------------------
# Defaults and matrices
# --------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def merge(base: dict, over: dict) -> dict:
    """``defaults`` under a job: mappings merge key by key, anything else is the job's own value."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def points(matrix: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of a matrix's values, as ``{name: value}`` (one empty point without one)."""
    if not matrix:
        return [{}]
    keys = list(matrix)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(matrix[k] for k in keys))]


def substitute(value: Any, point: dict, path: tuple, used: set, errors: Errors, src: Source) -> Any:
    """``${name}`` replaced by the point's value (typed when it is the whole string), ``$${`` by ``${``;
    unknown names are errors at their location; the names met go into ``used``."""
    if isinstance(value, dict):
        return {k: substitute(v, point, (*path, k), used, errors, src) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, point, (*path, i), used, errors, src) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value
    whole = _PLACEHOLDER.fullmatch(value)
    if whole and whole.group(1):
        name = whole.group(1)
        if name not in point:
            errors.add(src.loc(path), f"${{{name}}} is not a matrix key (matrix: {', '.join(point) or 'none'})")
            return value
        used.add(name)
        return point[name]

    def repl(m: re.Match) -> str:
        if m.group(1) is None:
            return "${"
        if m.group(1) not in point:
            errors.add(src.loc(path), f"${{{m.group(1)}}} is not a matrix key (matrix: {', '.join(point) or 'none'})")
            return m.group(0)
        used.add(m.group(1))
        return str(point[m.group(1)])

    return _PLACEHOLDER.sub(repl, value)


# --------------------------------------------------------------------------------------------
# Error messages (the messages; their locations and lines: Errors)
# --------------------------------------------------------------------------------------------


def unknown_tag(e: ErrorDetails) -> str | None:
    """The pass name of a step whose one key names no known pass."""
    if e["type"] == "union_tag_invalid":
        return str(e["ctx"]["tag"])
    inp = e.get("input")
    if e["type"] == "step_shape" and isinstance(inp, dict) and len(inp) == 1:
        return str(next(iter(inp)))
    return None


def error_message(e: ErrorDetails, known: list[str]) -> str:
    """One pydantic error as the line a user reads (``known``: the pass names, for typos)."""
    kind = e["type"]
    tag = unknown_tag(e)
    if tag is not None:
        close = difflib.get_close_matches(tag, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown pass {tag!r}{hint}; known passes: {', '.join(known)}"
    if kind == "extra_forbidden":
        return "unknown key (a typo?)"
    if kind == "step_shape" and isinstance(e.get("input"), dict):
        return f"a step is a one-key mapping such as `prune: {{drop_attn: 0.5}}`, got keys {', '.join(map(str, e['input']))}"
    msg = e["msg"].removeprefix("Value error, ")
    inp = e.get("input")
    if isinstance(inp, (str, int, float, bool)) and kind not in ("missing", "value_error") and repr(inp) not in msg:
        msg += f" (got {inp!r})"
    return msg
