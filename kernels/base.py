"""The :class:`Kernel` record every kernel module fills in (see ``registry.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx
import torch

DOMAIN = "squeeze"
DOMAIN_VERSION = 1


@dataclass(frozen=True)
class Kernel:
    """One custom operator and everything needed to run, export and check it."""

    name: str  # registry key and torch op name: torch.ops.squeeze.<name>
    onnx_op: str  # node type in the graph: the squeeze-domain op, or the standard ops of a lowering
    domain: str  # "squeeze" (custom node + local function) or "" (lowered to standard ops)
    summary: str
    reference: Callable[..., torch.Tensor]
    symbolic: Callable[..., Any]
    examples: Callable[[torch.Generator], list[tuple]]  # random argument tuples, first arg is the input
    function: Callable[[int], onnx.FunctionProto] | None = None  # (opset) -> local function
    tensorrt_plugin: str | None = None
    tensorrt_plugin_version: str | None = None
    tensorrt_note: str = ""
    tolerance: float = 1e-5  # max abs error accepted between the three implementations

    @property
    def op(self) -> Callable[..., torch.Tensor]:
        return getattr(torch.ops.squeeze, self.name)

    @property
    def qualname(self) -> str:
        return f"{DOMAIN}::{self.name}"
