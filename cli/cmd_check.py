"""``squeeze check``: static deployment readiness of an ONNX graph (TensorRT)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from squeeze.cli.cmd_export import print_trt
from squeeze.cli.common import print_json
from squeeze.cli.options import Json
from squeeze.compress.errors import SqueezeError, ValidationFailed
from squeeze.compress.export import read_onnx, tensorrt_readiness


def check(
    model: Annotated[Path, typer.Argument(help="An .onnx file.")],
    target: str = typer.Option("tensorrt", "--target", help="Only tensorrt is checked statically."),
    as_json: Json = False,
) -> None:
    """Static deployment readiness of an ONNX graph (exit 1 if something would not parse).

    Example: squeeze check model.onnx --target tensorrt
    """
    if target != "tensorrt":
        raise SqueezeError(f"--target must be tensorrt, got {target!r}")
    if not model.is_file():
        raise SqueezeError(f"{model}: no such file")
    proto = read_onnx(model)
    trt = tensorrt_readiness(proto)
    if as_json:
        print_json(trt)
    else:
        print_trt(trt)
    if not trt["ok"]:
        raise ValidationFailed(f"{len(trt['problems'])} node(s) TensorRT would not parse")


def register(app: typer.Typer) -> None:
    app.command("check")(check)
