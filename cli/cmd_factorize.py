"""``squeeze factorize``: DSFormer dense x sparse factorization with the Straight-Through Factorizer.

squeeze factorize CKPT -o OUT --ratio 0.5                    # init only (alternating minimization)
squeeze factorize CKPT -o OUT --ratio 0.5 --stf-steps 300    # + STF training and a short fine-tune
squeeze factorize CKPT -o OUT --rank 64 --nnz 16 --targets mlp
"""

from __future__ import annotations

from pathlib import Path

import typer

from squeeze.cli.common import (
    data_spec,
    pass_config,
)
from squeeze.cli.options import Dtype, Force, Json, Output, SeqLen, TrustPickle
from squeeze.cli.pass_command import run_and_report
from squeeze.compress.errors import SqueezeError


def factorize(
    ckpt: str = typer.Argument(..., help="Model folder, pkg:NAME/sub or squeeze folder."),
    output: Output = ...,
    ratio: float = typer.Option(None, "--ratio", help="Share of each linear's weight bytes kept (0, 1]; default 0.5."),
    rank: int = typer.Option(None, "--rank", help="k, the columns of D (instead of --ratio)."),
    nnz: int = typer.Option(None, "--nnz", help="s, non-zeros per column of S (<= rank)."),
    density: float = typer.Option(0.25, "--density", help="s / k under a --ratio budget."),
    allocation: str = typer.Option(
        "uniform", "--allocation", help="uniform (ratio per linear) or error (the total, by measured error)."
    ),
    pattern: str = typer.Option("column", "--pattern", help="column (s per column) or nm (n of every m rows)."),
    nm_group: int = typer.Option(4, "--nm-group", help="m of the N:M pattern."),
    targets: str = typer.Option(
        "attn,mlp", "--targets", help="Roles: attn, mlp, q, k, v, qkv, attn_out, mlp_in, mlp_out."
    ),
    iters: int = typer.Option(10, "--iters", help="Alternating-minimization iterations."),
    coder: str = typer.Option("topk", "--coder", help="S-step: topk (least-squares code, top-s, refit) or omp."),
    stf_steps: int = typer.Option(0, "--stf-steps", help="Straight-Through Factorizer training steps (0: init only)."),
    stf_lr: float = typer.Option(1e-4, "--stf-lr", help="STF learning rate."),
    finetune_steps: int = typer.Option(None, "--finetune-steps", help="Fine-tune steps of D and S (default: stf/4)."),
    data: str = typer.Option(
        "auto", "--data", help="STF training data: auto (wiki text if installed), wiki, spans, builtin, a file."
    ),
    samples: int = typer.Option(2048, "--samples", min=1, help="STF training samples."),
    seq_len: SeqLen = 128,
    force: Force = False,
    trust_pickle: TrustPickle = False,
    as_json: Json = False,
    dtype: Dtype = None,
) -> None:
    """Replace linears by a small dense D times a column-sparse S (y = D (S x) + b)."""
    from squeeze.compress.passes.factorize import FactorizeConfig

    cfg = pass_config(
        FactorizeConfig,
        "factorize",
        ratio=ratio,
        rank=rank,
        nnz=nnz,
        density=density,
        allocation=allocation,
        pattern=pattern,
        nm_group=nm_group,
        targets=targets,
        iters=iters,
        coder=coder,
        stf_steps=stf_steps,
        stf_lr=stf_lr,
        finetune_steps=stf_steps // 4 if finetune_steps is None else finetune_steps,
        data=data,
        samples=samples,
        seq_len=seq_len,
    )
    for part in data.split("+"):
        if part not in ("auto", "wiki", "spans", "builtin", "synthetic") and not Path(part).exists():
            raise SqueezeError(f"--data: {part}: no such file or folder")
    if output.exists() and not force:
        raise SqueezeError(f"{output} already exists; pass --force to overwrite it")
    spec = data_spec("builtin", 128, seq_len)  # the fidelity measurement of the ledger

    from squeeze.compress.passes.factorize import FactorizePass

    def lines(report: dict) -> list[str]:
        m = report["metrics"]
        return [
            f"{m['factorized_linears']} linears at {m['linear_ratio']:.3f} of their bytes; relative weight "
            f"error {m['init_error_mean']:.4f} (truncated SVD of equal bytes: {m['svd_error_mean']:.4f})"
        ]

    run_and_report(
        FactorizePass(cfg),
        ckpt,
        output,
        spec,
        force=force,
        trust_pickle=trust_pickle,
        as_json=as_json,
        lines=lines,
        dtype=dtype,
    )


def register(app: typer.Typer) -> None:
    app.command("factorize", epilog="Example: squeeze factorize model -o factorized --ratio 0.5")(factorize)
