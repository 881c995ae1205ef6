"""``squeeze export``: an ONNX graph (or an Optimum folder) validated against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from squeeze.cli.common import console, data_spec, fmt_bytes, fmt_num, print_json, progress
from squeeze.cli.options import CalibAlias, Data, Force, Json, TrustPickle, pick_data
from squeeze.compress.export import DEFAULT_ATOL, DEFAULT_RTOL
from squeeze.compress.export_folder import export_model
from squeeze.compress.run import load


def export(
    ckpt: Annotated[str, typer.Argument(help="Checkpoint folder (Hugging Face or squeeze).")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="The .onnx file to write, or a folder (Optimum layout).")
    ],
    opset: int = typer.Option(18, "--opset", help="ONNX opset (14-20; dynamo: 18+)."),
    atol: float = typer.Option(
        None, "--atol", help=f"Absolute tolerance of the validation [default: {DEFAULT_ATOL:g}; fp16 2e-2]."
    ),
    rtol: float = typer.Option(
        None, "--rtol", help=f"Relative tolerance of the validation [default: {DEFAULT_RTOL:g}; fp16 1e-2]."
    ),
    batch: int = typer.Option(2, "--batch", help="Validation batch size (a second shape uses batch+1)."),
    seq_len: int = typer.Option(16, "--seq-len", help="Validation sequence length (a second shape uses 2x)."),
    target: str = typer.Option("ort", "--target", help="ort, or tensorrt to also run the TensorRT readiness check."),
    exporter: str = typer.Option("torchscript", "--exporter", help="torchscript (fast) or dynamo."),
    plain: bool = typer.Option(False, "--plain", help="Inline squeeze custom ops into standard ONNX ops."),
    ref: str = typer.Option(None, "--ref", help="Also report the graph's fidelity against this checkpoint."),
    data: Data = "builtin",
    calib: CalibAlias = None,
    task: str = typer.Option(
        "auto",
        "--task",
        help="auto, text-generation-with-past (default for causal LMs), text-generation, feature-extraction.",
    ),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or fp16."),
    weights: str = typer.Option(None, "--weights", help="int4 or int8: blockwise MatMulNBits / GatherBlockQuantized."),
    block_size: int = typer.Option(32, "--block-size", help="Weight block size of --weights (power of two >= 16)."),
    optimize: bool | None = typer.Option(
        None,
        "--optimize/--no-optimize",
        help="Fuse with ONNX Runtime's transformer optimizer (default: on for bert-like encoders and vit).",
        show_default=False,
    ),
    force: Force = False,
    trust_pickle: TrustPickle = False,
    as_json: Json = False,
) -> None:
    """Export to ONNX with dynamic axes; validate against PyTorch; fail (exit 1) on disagreement.

    Example: squeeze export model -o model.onnx --weights int4
    """
    model = load(ckpt, trust_pickle=trust_pickle)  # a bad checkpoint's error stays the only line
    reference = load(ref, trust_pickle=trust_pickle) if ref else None
    spec = data_spec(pick_data(data, calib), 8, min(max(seq_len * 2, 8), 32_768))
    with progress() as bar:
        report = export_model(
            model,
            output,
            opset=opset,
            atol=atol,
            rtol=rtol,
            batch=batch,
            seq_len=seq_len,
            target=target,
            force=force,
            exporter=exporter,
            plain=plain,
            data=spec,
            reference=reference,
            task=task,
            dtype=dtype,
            weights=weights,
            block_size=block_size,
            optimize=optimize,
            progress=bar,
        )
    if as_json:
        print_json(report)
        return
    t = Table(title=f"{output}", title_justify="left")
    for col in ("shape", "max abs", "max rel", "cosine", "ok"):
        t.add_column(col)
    for c in report["validation"]:
        t.add_row(
            c["shape"], fmt_num(c["max_abs"]), fmt_num(c["max_rel"]), f"{c['cosine']:.6f}", "yes" if c["ok"] else "NO"
        )
    console.print(t)
    shape = f"batch {batch}" + (f", seq {seq_len}" if report["family"] != "vit" else "")
    console.print(
        f"size {fmt_bytes(report['bytes'])}, ORT latency {report.get('latency_ms', 0):.2f} ms ({shape}), "
        f"custom ops: {', '.join(report['custom_ops']) or 'none'}"
    )
    if report.get("fusion"):
        console.print(f"ONNX Runtime fusion: {report['fusion']}")
    if "generation" in report:
        g = report["generation"]
        console.print(
            f"greedy generation in ONNX Runtime: {g['new_tokens']} new tokens x {g['batch']} prompts, the same as "
            f"transformers' generate; KV-cache slots {report['cache_slots']}"
        )
    if "fidelity_vs_reference" in report:
        fid = report["fidelity_vs_reference"]
        console.print("fidelity vs reference: " + "  ".join(f"{k}={fmt_num(v)}" for k, v in fid.items()))
    if "tensorrt" in report:
        print_trt(report["tensorrt"])


def print_trt(trt: dict) -> None:
    status = "[green]ready[/green]" if trt["ok"] else "[red]NOT ready[/red]"
    console.print(f"TensorRT {trt['tensorrt_version']}: {status}")
    for p in trt["problems"]:
        console.print(f"  [red]x[/red] {p}")
    for n in trt["notes"]:
        console.print(f"  - {n}")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
