"""``squeeze merge A B [C ...] -o OUT [--weights 0.5,0.5]``: logit-averaging merge."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from squeeze.cli.common import console, data_spec, pass_config, print_json, progress, report_table
from squeeze.cli.options import CalibAlias, Data, Dtype, Force, Json, Output, SeqLen, TrustPickle, pick_data
from squeeze.compress.errors import SqueezeError
from squeeze.compress.passes.merge import MergeConfig


def parse_weights(text: str | None, n: int) -> list[float] | None:
    """``"0.5,0.5"`` -> ``[0.5, 0.5]``, checked: one per model, finite, non-negative, sum > 0."""
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise SqueezeError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) != n:
        raise SqueezeError(f"--weights has {len(weights)} values for {n} models (give one weight per model)")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise SqueezeError(f"--weights must be finite and non-negative, got {text!r}")
    if sum(weights) <= 0:
        raise SqueezeError("--weights must not all be zero")
    return weights


def merge(
    models: Annotated[
        list[str], typer.Argument(help="Two or more model folders (the first is the base), same family and tokenizer.")
    ],
    output: Output = ...,
    weights: str = typer.Option(
        None, "--weights", help="One weight per model, comma-separated (default: equal); normalised to sum 1."
    ),
    data: Data = "builtin",
    calib: CalibAlias = None,
    seq_len: SeqLen = 128,
    force: Force = False,
    trust_pickle: TrustPickle = False,
    as_json: Json = False,
    dtype: Dtype = None,
) -> None:
    """Merge models by averaging their logits (Growing Transformers): no router, no new weights.

    Example: squeeze merge base finetuned --weights 0.5,0.5 -o merged
    """
    from squeeze.compress.run import apply

    if len(models) < 2:
        raise SqueezeError(f"merge needs at least two models, got {len(models)}")
    parsed = parse_weights(weights, len(models))
    cfg = pass_config(MergeConfig, "merge", others=list(models[1:]), weights=parsed)
    with progress() as bar:
        merged = apply(
            models[0],
            cfg,
            data=data_spec(pick_data(data, calib), 128, seq_len),
            out=output,
            force=force,
            trust_pickle=trust_pickle,
            progress=bar,
            dtype=dtype,
        )
    report = merged.manifest.ledger[-1]
    if as_json:
        print_json(report)
        return
    console.print(report_table(report))
    m = report["metrics"]
    console.print(
        f"merged {m['experts']} experts, weights {', '.join(f'{w:.4g}' for w in m['weights'])}, "
        f"averaging {m['averaged']} -> {output}"
    )


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
