"""``quantize --target tensorrt``: static W8A8 that TensorRT's explicit quantization builds.

TensorRT takes symmetric int8 Q/DQ only: zero point 0, int8 activations and int8 weights
(compress/export_trt.py refuses a uint8 or non-zero zero point). The default static scheme
quantizes activations on an asymmetric uint8 grid, which ONNX Runtime runs best; with
``target: tensorrt`` instead:

* weights and activations must both be int8, activations static per tensor (not ``bct``'s
  per-block scales, which TensorRT's activation Q/DQ cannot carry);
* every linear input gets a symmetric int8 quantizer: RepQuant's reparameterization with
  symmetric per-channel clipping bounds (scale only; its layer-wise zero point then lies exactly
  mid-grid, 2^(b-1), which is the signed grid's 0: the same codes, shifted), and a symmetric
  percentile/MSE range search (min/max for ``minmax``) where there is no reparameterization;
* activation zero points are stored as int8 0, so the exported ``QuantizeLinear`` emits int8;
* attention matmuls (scores, softmax) and embedding tables stay float: squeeze's log-sqrt2
  softmax is a custom node for which TensorRT ships no plugin, and a uint8 table read by
  Gather is not a Q/DQ TensorRT consumes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from squeeze.compress.passes.quantize.uniform import Grid, minmax_range, params_from_range, search_range

TARGETS = ("ort", "tensorrt")


def check(cfg: Any) -> None:
    """Raise ValueError (a config error naming the field) for a scheme TensorRT cannot build."""
    if cfg.target != "tensorrt":
        return
    if cfg.weights != "int8" or cfg.activations != "int8":
        raise ValueError(
            "target tensorrt builds symmetric int8 Q/DQ: weights int8 and activations int8 (static), "
            f"got weights {cfg.weights}, activations {cfg.activations}"
        )
    if cfg.method == "bct":
        raise ValueError("target tensorrt quantizes activations per tensor; bct's per-block scales are not that")


def adapt(scheme: Any, cfg: Any) -> Any:
    """The engine's scheme for ``cfg.target``: signed activations, float attention and tables."""
    if cfg.target != "tensorrt":
        return scheme
    return dataclasses.replace(scheme, signed_act=True, softmax="float", embeddings=False)


def notes(cfg: Any) -> list[str]:
    """The ledger's line for what the target changed."""
    if cfg.target != "tensorrt":
        return []
    return [
        "target tensorrt: symmetric int8 activations (zero point 0); attention matmuls and embedding tables stay "
        "float (no shipped TensorRT plugin for the log-sqrt2 softmax; a uint8 Gather table is not Q/DQ)"
    ]


def signed_zero(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The reparameterization's mid-grid zero point (2^(b-1) on the unsigned grid) as the signed
    grid's 0: round(x/s) + 2^(b-1) clamped to [0, 2^b - 1] is round(x/s) clamped to
    [-2^(b-1), 2^(b-1) - 1], shifted."""
    mid = float(2 ** (bits - 1))
    if not bool(torch.all(zero == mid)):
        raise AssertionError(f"a symmetric reparameterization puts its zero point at {mid}, got {zero}")
    return torch.zeros_like(zero)


def signed_range(x: torch.Tensor, bits: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor symmetric (scale, zero point 0) of an activation on the int8 grid."""
    grid = Grid(bits, symmetric=True)
    lo, hi = minmax_range(x) if method == "minmax" else search_range(x, grid)
    return params_from_range(lo, hi, grid)
