"""Module surgery: what every pass may use to read and rewrite a model's parts.

* :func:`get_module` / :func:`set_module` / :func:`replace_module`: by dotted path (``""`` is the
  root); ``replace_module`` moves the new module to the old one's device and floating dtype.
* Linear weights in ``(out, in)`` layout whatever the module type: :func:`linear_weight`,
  :func:`set_linear_weight`, :func:`as_linear` (GPT-2's ``Conv1D`` stores its weight ``(in,
  out)``; nothing else in squeeze has to know).
* Affine folds, exact up to float rounding: for a per-channel ``x' = x / r - delta``,
  :func:`fold_into_norm` rewrites a norm's gain and bias so it emits ``x'``, and
  :func:`fold_into_consumer` rewrites the linears that read ``x'`` so they still compute
  ``W x + b``: ``W' = W diag(r)``, ``b' = b + W' delta``.
* Folding a per-channel affine ``y = a * x + b`` away (reparam's RepBN), in float64:
  :func:`fold_into_reader` / :func:`fold_linear_reader` for the layer that reads ``y``
  (``W' = W diag(a)``, ``b' = W b + bias``), :func:`fold_into_writer` / :func:`fold_linear_writer`
  for the layer that writes ``x`` (``W' = diag(a) W``, ``b' = a * bias + b``; SLAB's ``merge_bn``
  drops the ``a``-side ``eta * bias`` term here, which is exact only when eta or the bias is 0).

Example::

    old = replace_module(block, "proj", as_linear(get_module(block, "proj")))
    fold_into_norm(norm, r, delta)
    w, b = fold_into_consumer(linear_weight(fc), fc.bias, r, delta)
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "as_linear",
    "fold_into_consumer",
    "fold_into_norm",
    "fold_into_reader",
    "fold_into_writer",
    "fold_linear_reader",
    "fold_linear_writer",
    "get_module",
    "is_linear",
    "linear_weight",
    "replace_module",
    "set_linear_weight",
    "set_module",
    "with_bias",
]


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (``""`` is ``root`` itself)."""
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` (the parent must exist); no device or dtype change."""
    if not path:
        raise ValueError("cannot replace the root module in place")
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent), name, module)


def replace_module(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Swap the module at ``path`` for ``module`` on the old one's device and floating dtype; return the old."""
    old = get_module(root, path)
    ref: torch.Tensor | None = next(iter(old.parameters()), None)
    if ref is None:
        ref = next(iter(old.buffers()), None)
    if ref is not None:
        module.to(device=ref.device)
        if ref.dtype.is_floating_point:
            module.to(dtype=ref.dtype)
    set_module(root, path, module)
    return old


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear or Conv1D as an ``(out, in)`` tensor (a view, not a copy)."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"not a linear module: {type(module).__name__}")


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``(out, in)`` weight into a Linear or Conv1D in place."""
    with torch.no_grad():
        if isinstance(module, Conv1D):
            module.weight.copy_(weight.t())
        elif isinstance(module, nn.Linear):
            module.weight.copy_(weight)
        else:
            raise TypeError(f"not a linear module: {type(module).__name__}")


def as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same function as a Linear or Conv1D (the module itself if Linear)."""
    if isinstance(module, nn.Linear):
        return module
    w = linear_weight(module)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        if module.bias is not None:
            lin.bias.copy_(cast(torch.Tensor, module.bias))
    return lin


def fold_into_norm(norm: nn.Module, r: torch.Tensor, delta: torch.Tensor) -> None:
    """Make a norm emit ``x / r - delta`` (per channel) instead of ``x``: ``gamma' = gamma / r``,
    ``beta' = beta / r - delta``, in place. A norm without a bias (RMSNorm) accepts only
    ``delta == 0``."""
    with torch.no_grad():
        cast(torch.Tensor, norm.weight).div_(r)
        bias = getattr(norm, "bias", None)
        if bias is not None:
            bias.div_(r).sub_(delta)
        elif bool((delta != 0).any()):
            raise ValueError("this norm has no bias to absorb the zero-point shift")


def fold_into_consumer(
    weight: torch.Tensor, bias: torch.Tensor | None, r: torch.Tensor, delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For a linear reading ``x' = x / r - delta``: ``W' = W diag(r)``, ``b' = b + W' delta`` (a new
    bias when there was none and delta != 0), so ``W' x' + b' == W x + b``. ``weight`` is
    ``(out, in)``; returns new tensors."""
    w = weight.detach() * r[None, :]
    if bool((delta != 0).any()):
        b = (bias.detach() if bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)) + w @ delta
        return w, b
    return w, (bias.detach() if bias is not None else None)


def fold_into_reader(
    weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of a layer reading ``y = a * x + b``: ``W' x + b' == W y + bias``. ``weight`` is
    ``(out, in)``, ``a`` and ``b`` ``(in,)``; computed in float64, returned in the weight's dtype."""
    w = weight.detach().double()
    new_b = w @ b.detach().double()
    if bias is not None:
        new_b = new_b + bias.detach().double()
    return (w * a.detach().double()[None, :]).to(weight.dtype), new_b.to(weight.dtype)


def fold_into_writer(
    weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of a layer whose output ``x`` then goes through ``a * x + b``: ``W' = diag(a) W``,
    ``b' = a * bias + b``. ``weight`` is ``(out, ...)`` with output channels first (Linear, Conv)."""
    a64 = a.detach().double()
    new_w = weight.detach().double() * a64.reshape((-1,) + (1,) * (weight.ndim - 1))
    new_b = b.detach().double() + (a64 * bias.detach().double() if bias is not None else 0.0)
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


def with_bias(module: nn.Module) -> nn.Module:
    """``module`` itself when it has a bias, else an ``nn.Linear`` copy of it with a zero bias."""
    if getattr(module, "bias", None) is not None:
        return module
    if not isinstance(module, nn.Linear):
        raise TypeError(f"cannot add a bias to {type(module).__name__}")
    w = module.weight
    lin = nn.Linear(module.in_features, module.out_features, bias=True, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.zero_()
    return lin


def fold_linear_reader(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """Fold ``a * x + b`` into the Linear / Conv1D that reads it; returns the module to use (a new
    biased Linear when the old one had no bias)."""
    module = with_bias(module)
    w, bias = fold_into_reader(linear_weight(module), cast(torch.Tensor | None, module.bias), a, b)
    set_linear_weight(module, w)
    with torch.no_grad():
        cast(torch.Tensor, module.bias).copy_(bias)
    return module


def fold_linear_writer(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """Fold ``a * y + b`` into the Linear / Conv1D that writes ``y``; returns the module to use."""
    module = with_bias(module)
    w, bias = fold_into_writer(linear_weight(module), cast(torch.Tensor | None, module.bias), a, b)
    set_linear_weight(module, w)
    with torch.no_grad():
        cast(torch.Tensor, module.bias).copy_(bias)
    return module
