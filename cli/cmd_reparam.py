"""``squeeze reparam``: SLAB's progressive LayerNorm -> RepBN, folded away; optional SLA for ViT.

Examples::

    squeeze reparam CKPT -o OUT                              # every norm, 600 steps, folded
    squeeze reparam CKPT -o OUT --data digits.npz --attention sla --steps 1000
    squeeze reparam CKPT -o OUT --no-fold                    # keep RepBN modules (to train further)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from squeeze.cli.common import data_spec, pass_config
from squeeze.cli.options import Dtype
from squeeze.cli.pass_command import run_and_report
from squeeze.compress.errors import SqueezeError


def reparam(
    ckpt: Annotated[str, typer.Argument(help="Model folder, pkg:NAME/sub or squeeze folder.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (written atomically).")],
    norms: Annotated[str, typer.Option(help="Which norms: all, attn, mlp or final.")] = "all",
    steps: Annotated[int, typer.Option(help="Optimizer steps of distillation against the original.")] = 600,
    warmup: Annotated[int, typer.Option(help="Steps with gamma = 1 (the original norm only) first.")] = 0,
    decay: Annotated[int, typer.Option(help="Steps of the gamma 1 -> 0 decay (-1: half of steps - warmup).")] = -1,
    attention: Annotated[str, typer.Option(help="keep, or sla (simplified linear attention, ViT).")] = "keep",
    fold: Annotated[bool, typer.Option("--fold/--no-fold", help="Fold every RepBN into its neighbours.")] = True,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-4,
    accumulate: Annotated[int, typer.Option(help="Batches per optimizer step.")] = 1,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "--calib",
            help="Training data: auto (wiki text; images need a file), wiki, spans, builtin, a .txt/.jsonl file, "
            "an .npz or an image folder. A file also gives the held-apart evaluation samples.",
        ),
    ] = "auto",
    samples: Annotated[int, typer.Option(min=1, max=1_000_000, help="Training samples.")] = 4096,
    seq_len: Annotated[int, typer.Option(min=4, max=32_768, help="Tokens per sample.")] = 128,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output.")] = False,
    trust_pickle: Annotated[bool, typer.Option(help="Allow pickle weights (read with weights_only=True).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    dtype: Dtype = None,
) -> None:
    """Replace norms by RepBN progressively (distilled against the original), then fold them away."""
    from squeeze.compress.passes.reparam.reparam import ReparamConfig, ReparamPass

    cfg = pass_config(
        ReparamConfig,
        "reparam",
        norms=norms,
        steps=steps,
        warmup=warmup,
        decay=None if decay == -1 else decay,
        attention=attention,
        fold=fold,
        lr=lr,
        accumulate=accumulate,
        data=data,
        samples=samples,
        seq_len=seq_len,
    )
    if output.exists() and not force:
        raise SqueezeError(f"{output} already exists; pass --force to overwrite it")
    is_file = data not in ("auto", "builtin", "synthetic", "wiki", "spans") and "+" not in data
    spec = data_spec(data if is_file else "builtin", min(samples, 100_000), seq_len)

    run_and_report(
        ReparamPass(cfg),
        ckpt,
        output,
        spec,
        force=force,
        trust_pickle=trust_pickle,
        as_json=as_json,
        dtype=dtype,
        lines=lambda report: [f"  - {line}" for line in report["metrics"]["reparam"]["summary"]],
    )


def register(app: typer.Typer) -> None:
    app.command("reparam", epilog="Example: squeeze reparam model -o reparam --data digits.npz")(reparam)
