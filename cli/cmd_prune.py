"""``squeeze prune``: drop attention / MLP sublayers or whole blocks (LLM-Drop).

squeeze prune CKPT --drop-attn 0.5 -o OUT
squeeze prune CKPT --drop-mlp 2 | --drop-blocks 2 | --drop-joint 4 [--iterative] -o OUT
squeeze prune CKPT --attn-layers 3,5 -o OUT          # explicit, no scoring
squeeze prune CKPT --drop-attn 0.5 --dry-run         # scores only
"""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from squeeze.cli.common import console, data_spec, pass_config, print_json, progress, report_table
from squeeze.cli.options import (
    CalibAlias,
    Data,
    Dtype,
    Force,
    Json,
    MaxShardSize,
    Offload,
    OptionalOutput,
    Samples,
    SeqLen,
    TrustPickle,
    pick_data,
)
from squeeze.compress.errors import SqueezeError

AmountHelp = "a share of the layers (0.5) or a count (2)"


def _amount(text: str | None, flag: str) -> int | float | None:
    if text is None:
        return None
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise SqueezeError(f"{flag}: expected {AmountHelp}, got {text!r}") from None


def _indices(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SqueezeError(f"{flag}: expected comma-separated layer indices (3,5), got {text!r}") from None


def _config(**kw: Any):
    from squeeze.compress.passes.prune import PruneConfig

    return pass_config(PruneConfig, "prune", **kw)


def scores_table(result: dict[str, Any], title: str = "") -> Table:
    """Layer, attention S, MLP S, block S, and what was dropped."""
    scores = result.get("scores") or {}
    t = Table(title=title or "similarity S (higher = changes the stream less = dropped first)", title_justify="left")
    for col in ("layer", "attention S", "MLP S", "block S", "dropped"):
        t.add_column(col, justify="right" if col != "dropped" else "left")
    att, mlp, blocks = set(result.get("attention", [])), set(result.get("mlp", [])), set(result.get("blocks", []))

    def fmt(key: str, i: int) -> str:
        vals = scores.get(key) or []
        if i >= len(vals):
            return "-"
        return "gone" if vals[i] is None else f"{vals[i]:.4f}"  # None: an earlier step dropped it

    for i in range(int(result.get("num_layers", 0))):
        what = "block" if i in blocks else ", ".join(w for w, s in (("attention", att), ("MLP", mlp)) if i in s)
        t.add_row(
            str(i),
            fmt("attn", i),
            fmt("mlp", i),
            fmt("block", i),
            f"[red]{what}[/red]" if what else "[green]kept[/green]",
        )
    return t


def prune(
    ckpt: str = typer.Argument(..., help="Model folder, pkg:NAME/sub or squeeze folder."),
    output: OptionalOutput = None,
    drop_attn: str = typer.Option(None, "--drop-attn", help=f"Attention sublayers to drop: {AmountHelp}."),
    drop_mlp: str = typer.Option(None, "--drop-mlp", help=f"MLP sublayers to drop: {AmountHelp}."),
    drop_blocks: str = typer.Option(None, "--drop-blocks", help=f"Whole blocks to drop: {AmountHelp}."),
    drop_joint: str = typer.Option(
        None, "--drop-joint", help=f"Sublayers (attention or MLP, one ranking of 2L): {AmountHelp}."
    ),
    attn_layers: str = typer.Option(None, "--attn-layers", help="Drop these attention sublayers (3,5), no scoring."),
    mlp_layers: str = typer.Option(None, "--mlp-layers", help="Drop these MLP sublayers, no scoring."),
    block_layers: str = typer.Option(None, "--block-layers", help="Drop these blocks, no scoring."),
    iterative: bool = typer.Option(False, "--iterative", help="Re-score after each single drop."),
    consecutive: bool = typer.Option(False, "--consecutive", help="Blocks: drop n adjacent blocks (ShortGPT style)."),
    keep_norm: bool = typer.Option(
        None,
        "--keep-norm/--no-keep-norm",
        help="BERT (post-LN) only: a dropped sublayer keeps its LayerNorm (default: yes, measured better).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Score and show what would be dropped; write nothing."),
    data: Data = "builtin",
    calib: CalibAlias = None,
    samples: Samples = 128,
    seq_len: SeqLen = 128,
    force: Force = False,
    trust_pickle: TrustPickle = False,
    as_json: Json = False,
    dtype: Dtype = None,
    offload: Offload = None,
    max_shard_size: MaxShardSize = None,
) -> None:
    """Drop the attention / MLP sublayers or blocks that change the residual stream least.

    Example: squeeze prune model --drop-attn 0.5 --data texts.txt -o pruned
    """
    cfg = _config(
        drop_attn=_amount(drop_attn, "--drop-attn"),
        drop_mlp=_amount(drop_mlp, "--drop-mlp"),
        drop_blocks=_amount(drop_blocks, "--drop-blocks"),
        drop_joint=_amount(drop_joint, "--drop-joint"),
        attn_layers=_indices(attn_layers, "--attn-layers"),
        mlp_layers=_indices(mlp_layers, "--mlp-layers"),
        block_layers=_indices(block_layers, "--block-layers"),
        iterative=iterative,
        consecutive=consecutive,
        keep_norm=keep_norm,
    )
    if output is None and not dry_run:
        raise SqueezeError("-o/--output is required (or pass --dry-run to see the scores only)")
    spec = data_spec(pick_data(data, calib), samples, seq_len)

    from squeeze.compress.offload import route

    with progress() as bar:
        done = route(
            ckpt,
            cfg,
            offload=offload,
            max_shard_size=max_shard_size,
            data=spec,
            out=output,
            dry_run=dry_run,
            force=force,
            trust_pickle=trust_pickle,
            progress=bar,
            dtype=dtype,
        )
    if dry_run:
        result, report, warnings = done.result or {}, None, done.warnings
    else:
        result, report, warnings = done.manifest.edits[-1]["result"], done.manifest.ledger[-1], []
    if as_json:
        print_json({"result": result, "report": report, "output": str(output) if not dry_run else None})
        return
    console.print(scores_table(result))
    if report is None:  # dry run: no ledger row carries the warnings
        for w in warnings:
            console.print(f"[yellow]warning:[/yellow] {w}")
        return
    console.print(report_table(report))
    console.print(f"wrote {output}")


def register(app: typer.Typer) -> None:
    app.command("prune")(prune)
