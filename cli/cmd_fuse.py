"""``squeeze fuse A B [C ...] -o OUT``: optimal-transport fusion of several models into one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from squeeze.cli.common import console, data_spec, pass_config, print_json, progress, report_table
from squeeze.cli.options import Dtype
from squeeze.compress.errors import SqueezeError


def fuse(
    models: Annotated[
        list[str], typer.Argument(help="Two or more model folders of one family; the last is the anchor.")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (written atomically).")],
    anchor: Annotated[
        str | None, typer.Option(help="The model whose shape the result takes (default: the last).")
    ] = None,
    cost: Annotated[str, typer.Option(help="Ground cost: acts (activations) or weights.")] = "acts",
    solver: Annotated[str, typer.Option(help="sinkhorn (soft), emd (hard) or none (vanilla averaging).")] = "sinkhorn",
    reg: Annotated[float, typer.Option(help="Sinkhorn regularisation of the max-normalised cost.")] = 0.08,
    residual: Annotated[str, typer.Option(help="Residual policy: mean, weighted, only_resid, no_resid.")] = "mean",
    weights: Annotated[str | None, typer.Option(help="One weight per model, comma-separated (default: 1/N).")] = None,
    data: Annotated[
        str, typer.Option(help="Activation data: builtin, synthetic, .txt, .jsonl, .npz, image folder.")
    ] = "builtin",
    samples: Annotated[int, typer.Option(min=1, max=100_000, help="Calibration samples.")] = 128,
    seq_len: Annotated[int, typer.Option(min=4, max=32_768, help="Tokens per calibration sample.")] = 128,
    finetune_steps: Annotated[int, typer.Option(help="Distil the fused model from the parents' ensemble.")] = 0,
    finetune_lr: Annotated[float, typer.Option(help="Peak learning rate of the fine-tune.")] = 1e-4,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow pickle weights (weights_only).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    dtype: Dtype = None,
) -> None:
    """Fuse models by aligning their neurons with optimal transport, then averaging (Imfeld et al., ICLR 2024)."""
    from squeeze.cli.cmd_merge import parse_weights
    from squeeze.compress.passes.fuse import FuseConfig, FuseResult
    from squeeze.compress.run import apply

    if len(models) < 2:
        raise SqueezeError(f"fuse needs at least two models, got {len(models)}")
    anchor_i = len(models) - 1
    if anchor is not None:  # the same reference, or the same folder written another way
        same = [i for i, m in enumerate(models) if m == anchor or Path(m).resolve() == Path(anchor).resolve()]
        if not same:
            raise SqueezeError(f"--anchor: {anchor!r} is not one of the models given")
        anchor_i = same[-1]
    cfg = pass_config(FuseConfig, "fuse", others=list(models[1:]), anchor=anchor_i, cost=cost, solver=solver, reg=reg,
                      residual=residual, weights=parse_weights(weights, len(models)), finetune_steps=finetune_steps,
                      finetune_lr=finetune_lr)  # fmt: skip
    with progress() as bar:
        fused = apply(models[0], cfg, data=data_spec(data, samples, seq_len), out=output, force=force,
                      trust_pickle=trust_pickle, progress=bar, dtype=dtype)  # fmt: skip
    report = fused.manifest.ledger[-1]
    if as_json:
        print_json(report)
        return
    console.print(report_table(report))
    for line in FuseResult.model_validate(fused.manifest.edits[-1]["result"]).summary():
        console.print(f"{line} -> {output}")


def register(app: typer.Typer) -> None:
    app.command("fuse", epilog="Example: squeeze fuse a b -o fused --solver sinkhorn")(fuse)
