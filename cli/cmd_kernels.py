"""``squeeze kernels``: list the custom operators, and validate them on demand.

squeeze kernels                 # name, ONNX node, TensorRT plugin, what it computes
squeeze kernels --validate      # reference vs custom op vs onnxruntime on random shapes
"""

from __future__ import annotations

import typer
from rich.table import Table

from squeeze.cli.common import console, print_json
from squeeze.cli.options import Json
from squeeze.compress.errors import ValidationFailed


def kernels(
    validate: bool = typer.Option(False, "--validate", help="Run each kernel: reference vs custom op vs onnxruntime."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Seed of the random shapes and values."),
    as_json: Json = False,
) -> None:
    """The squeeze kernels: PyTorch reference, torch.library op, ONNX form, TensorRT plugin."""
    from squeeze.kernels.registry import KERNELS
    from squeeze.kernels.registry import validate as run_validation

    rows = []
    for k in KERNELS.values():
        row = {
            "name": k.name,
            "torch_op": f"torch.ops.{k.qualname.replace('::', '.')}",
            "onnx": f"{k.domain}::{k.onnx_op} (local function)" if k.domain else f"{k.onnx_op} (standard ops)",
            "tensorrt_plugin": f"{k.tensorrt_plugin} v{k.tensorrt_plugin_version}" if k.tensorrt_plugin else None,
            "tensorrt_note": k.tensorrt_note,
            "summary": k.summary,
        }
        if validate:
            row["validation"] = run_validation(k, seed=seed)
        rows.append(row)
    failed = [r["name"] for r in rows if validate and not r["validation"]["ok"]]
    if as_json:
        print_json(rows)
    else:
        t = Table(title="squeeze kernels", title_justify="left")
        for col in ("kernel", "ONNX", "TensorRT", "computes"):
            t.add_column(col)
        if validate:
            for col in ("shapes", "op err", "ORT err", "ok"):
                t.add_column(col, justify="right")
        for r in rows:
            cells = [r["name"], r["onnx"], r["tensorrt_plugin"] or r["tensorrt_note"], r["summary"]]
            if validate:
                v = r["validation"]
                cells += [
                    ", ".join(v["shapes"]),
                    f"{v['max_err_op']:.2g}",
                    f"{v['max_err_ort']:.2g}",
                    "[green]yes[/green]" if v["ok"] else "[red]NO[/red]",
                ]
            t.add_row(*cells)
        console.print(t)
    if failed:
        raise ValidationFailed(f"kernel validation failed: {', '.join(failed)}")


def register(app: typer.Typer) -> None:
    app.command("kernels", epilog="Example: squeeze kernels --validate")(kernels)
