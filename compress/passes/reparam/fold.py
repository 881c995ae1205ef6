"""Exact folds of a per-channel affine ``y = a * x + b`` into neighbouring layers.

Generic weight algebra (no model knowledge); which neighbours a norm may fold into is decided
by the reparam pass from the family's roles. Weights are ``(out, in, ...)`` tensors: a Linear's
weight, a Conv's weight (out channels first); GPT-2's transposed Conv1D goes through
``Family.linear_weight``. Everything is computed in float64 and written back in the layer's dtype.

* into the layer that *reads* the affine's output:   W' = W diag(a),  b' = W b + bias
* into the layer that *writes* the affine's input:   W' = diag(a) W,  b' = a * bias + b

SLAB's ``merge_bn`` folds a RepBN into a preceding conv with b' = gamma (bias - mu) / sigma + beta,
which drops the ``eta * bias`` term (exact only when eta = 0 or bias = 0); the second formula
above keeps it.
"""

from __future__ import annotations

import torch
from torch import nn

from squeeze.compress.families import Family


def fold_into_reader(weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor):
    """(W', b') of a layer that reads ``a * x + b``: ``W' x + b' == W (a * x + b) + bias``.

    Args:
        weight: (out, in) weight.
        bias: (out,) or None (then b' = W b).
        a, b: (in,) affine.
    """
    w = weight.double()
    new_w = w * a.double()[None, :]
    new_b = w @ b.double()
    if bias is not None:
        new_b = new_b + bias.double()
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


def fold_into_writer(weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor):
    """(W', b') of a layer whose output then goes through ``a * y + b``: ``a * (W x + bias) + b``.

    ``weight`` is (out, ...) with output channels first (Linear, Conv); ``bias`` (out,) or None.
    """
    shape = (-1,) + (1,) * (weight.ndim - 1)
    new_w = weight.double() * a.double().reshape(shape)
    new_b = b.double() + (a.double() * bias.double() if bias is not None else 0.0)
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


def with_bias(module: nn.Module) -> nn.Module:
    """``module`` itself if it has a bias, else an ``nn.Linear`` copy with a zero bias."""
    if getattr(module, "bias", None) is not None:
        return module
    if not isinstance(module, nn.Linear):
        raise TypeError(f"cannot add a bias to {type(module).__name__}")
    lin = nn.Linear(
        module.in_features, module.out_features, bias=True, dtype=module.weight.dtype, device=module.weight.device
    )
    with torch.no_grad():
        lin.weight.copy_(module.weight)
        lin.bias.zero_()
    return lin


def fold_linear_reader(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """Fold ``a * x + b`` into a Linear / Conv1D that reads it; returns the module to use (a new
    biased Linear where the old one had no bias)."""
    module = with_bias(module)
    w, bias = fold_into_reader(Family.linear_weight(module), module.bias, a, b)
    Family.set_linear_weight(module, w)
    with torch.no_grad():
        module.bias.copy_(bias)
    return module


def fold_linear_writer(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """Fold ``a * y + b`` into the Linear / Conv1D that writes ``y``; returns the module to use."""
    module = with_bias(module)
    w, bias = fold_into_writer(Family.linear_weight(module), module.bias, a, b)
    Family.set_linear_weight(module, w)
    with torch.no_grad():
        module.bias.copy_(bias)
    return module
