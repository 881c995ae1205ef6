"""``squeeze quantize``: post-training quantization (RepQuant / RepQ-ViT, BCT, plain baselines).

squeeze quantize CKPT -o OUT                                   # int8 weights, ORT dynamic activations
squeeze quantize CKPT -o OUT --activations int8 --data data.txt   # static QDQ (TensorRT, edge)
squeeze quantize CKPT -o OUT --weights int4 --activations none     # weight-only
squeeze quantize CKPT -o OUT --activations none --format compressed-tensors  # loads in plain transformers
"""

from __future__ import annotations

from typing import Any

import typer

from squeeze.cli.common import console, data_spec, pass_config, print_json, progress, report_table
from squeeze.cli.options import (
    CalibAlias,
    Data,
    Dtype,
    Force,
    Json,
    MaxShardSize,
    Offload,
    Output,
    Samples,
    SeqLen,
    TrustPickle,
    pick_data,
)


def _config(**kw: Any):
    from squeeze.compress.passes.quantize import QuantizeConfig

    return pass_config(QuantizeConfig, "quantize", **kw)


def quantize(
    ckpt: str = typer.Argument(..., help="Model folder, pkg:NAME/sub or squeeze folder."),
    output: Output = ...,
    weights: str = typer.Option("int8", "--weights", help="Weight bits: int8, int6, int4 (int2..int16)."),
    activations: str = typer.Option(
        "dynamic",
        "--activations",
        help="dynamic (ORT picks them at run time), int8 / int6 / int4 (static, calibrated), or none.",
    ),
    method: str = typer.Option("repquant", "--method", help="repquant, minmax, percentile or bct."),
    gptq: bool = typer.Option(True, "--gptq/--no-gptq", help="repquant: GPTQ weight rounding (else round to nearest)."),
    block_size: int = typer.Option(64, "--block-size", help="bct: channels per block."),
    embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings", help="Quantize embedding tables (uint8)."),
    clip_steps: int = typer.Option(50, "--clip-steps", help="repquant static: dual-clipping optimisation steps."),
    fc2_reparam: bool = typer.Option(
        True,
        "--fc2-reparam/--no-fc2-reparam",
        help="repquant static: reparameterize the MLP output's input per channel (squeeze's extension).",
    ),
    fmt: str = typer.Option(
        "squeeze",
        "--format",
        help="squeeze, or compressed-tensors (int8/int4 weights plain transformers and vLLM load; "
        "--activations none or dynamic).",
    ),
    target: str = typer.Option(
        "ort", "--target", help="ort, or tensorrt: symmetric int8 Q/DQ (static W8A8) that TensorRT builds."
    ),
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
    """Quantize weights (and activations) post-training; writes integer weights + scales.

    Example: squeeze quantize model --weights int8 --activations int8 --data texts.txt -o quantized
    """
    cfg = _config(
        weights=weights,
        activations=activations,
        method=method,
        gptq=gptq,
        block_size=block_size,
        embeddings=embeddings,
        clip_steps=clip_steps,
        target=target,
        fc2_reparam=fc2_reparam,
        format=fmt,
    )
    spec = data_spec(pick_data(data, calib), samples, seq_len)

    from squeeze.compress.offload import route

    with progress() as bar:
        new = route(
            ckpt,
            cfg,
            offload=offload,
            max_shard_size=max_shard_size,
            data=spec,
            out=output,
            force=force,
            trust_pickle=trust_pickle,
            progress=bar,
            dtype=dtype,
        )
    report = new.manifest.ledger[-1]
    if as_json:
        print_json({"report": report, "output": str(output)})
        return
    console.print(report_table(report))
    scheme = report["metrics"]["scheme"]
    console.print(
        f"weights int{scheme['weights']} ({'GPTQ' if scheme['gptq'] else 'round to nearest'}), "
        f"activations {scheme['activations']}"
        + (f" int{scheme['activation_bits']}" if scheme["activations"] in ("static", "block") else "")
        + f", method {scheme['method']}: {report['metrics']['quantized_linears']} linears, "
        f"{report['metrics']['quantized_embeddings']} embedding tables"
    )
    for note in report["metrics"].get("notes", []):
        console.print(f"  - {note}")
    console.print(f"wrote {output}")


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)
