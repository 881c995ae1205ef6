"""What distillation compares: a model's targets on a batch, and the losses between two of them.

Every loss here is written so that identical student and teacher outputs give a loss of exactly
0.0 *and* gradients of exactly 0.0 (so a student equal to its teacher never moves, whatever the
optimizer): differences are formed first and squared, and the KL's gradient is computed in
closed form, ``(softmax(s / T) - softmax(t / T)) / T``, instead of through ``log_softmax``'s
backward, whose ``sum(p)`` is not exactly 1 in floating point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family

Batch = dict[str, torch.Tensor]


@dataclass
class Targets:
    """What one model (or an ensemble) produced on one batch.

    Attributes:
        output: logits ``(B, T, V)`` / ``(B, C)`` when ``kind == "logits"``; else the pooled
            embedding ``(B, H)`` (mask-aware mean of the last hidden state for text encoders,
            the CLS token for vision), as ``squeeze.compress.evaluate`` scores it.
        kind: ``"logits"`` or ``"embedding"``.
        hidden: the last hidden state ``(B, T, H)`` (after the final norm where the family has
            one), when asked for.
        layers: each transformer layer's output ``(B, T, H)``, when asked for.
        mask: ``(B, T)`` float, 1 for real tokens (all ones for images).
    """

    output: torch.Tensor
    kind: str
    hidden: torch.Tensor | None = None
    layers: list[torch.Tensor] | None = None
    mask: torch.Tensor | None = None

    def detach(self) -> Targets:
        return Targets(
            self.output.detach(),
            self.kind,
            None if self.hidden is None else self.hidden.detach(),
            None if self.layers is None else [h.detach() for h in self.layers],
            self.mask,
        )

    def nbytes(self) -> int:
        ts = [self.output, *([self.hidden] if self.hidden is not None else []), *(self.layers or [])]
        return sum(t.numel() * t.element_size() for t in ts)


#: A teacher is a model or a callable ``(batch, need_hidden, need_layers) -> Targets`` (an ensemble).
TeacherFn = Callable[[Batch, bool, bool], Targets]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def model_targets(
    model: nn.Module, family: Family, batch: Batch, *, need_hidden: bool = False, need_layers: bool = False
) -> Targets:
    """Run ``model`` on ``batch`` and collect its :class:`Targets` (grad follows the caller's mode)."""
    kwargs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
    if family.causal:
        kwargs["use_cache"] = False
    captured: dict[str, Any] = {"layers": []}
    handles = []
    if need_layers:
        for layer in family.layers(model):
            handles.append(layer.register_forward_hook(lambda m, a, o: captured["layers"].append(_first(o))))
    norm = family.final_norm_module(model) if need_hidden else None
    if norm is not None:
        handles.append(norm.register_forward_hook(lambda m, a, o: captured.__setitem__("hidden", _first(o))))
    try:
        out = model(**kwargs, return_dict=True)
    finally:
        for h in handles:
            h.remove()
    logits = getattr(out, "logits", None)
    last = getattr(out, "last_hidden_state", None)
    hidden = captured.get("hidden")
    if need_hidden and hidden is None:
        hidden = last if last is not None else captured["layers"][-1] if captured["layers"] else None
    if "pixel_values" in batch:
        ref = last if last is not None else hidden
        mask = torch.ones(ref.shape[:2]) if ref is not None else None
    else:
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).float()
    if logits is not None:
        return Targets(logits, "logits", hidden, captured["layers"] or None, mask)
    if last is None or mask is None:
        raise SqueezeError(f"{type(model).__name__}: output has neither logits nor last_hidden_state to distill")
    if family.modality == "vision":
        pooled = last[:, 0]
    else:
        m = mask.unsqueeze(-1)
        pooled = (last * m).sum(1) / m.sum(1).clamp_min(1.0)
    return Targets(pooled, "embedding", hidden if hidden is not None else last, captured["layers"] or None, mask)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


class _SoftKL(torch.autograd.Function):
    """Per-row KL(softmax(t / T) || softmax(s / T)) * T^2, with the closed-form gradient."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
        ls, lt = (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
        ctx.save_for_backward(ls, lt)
        ctx.temperature = temperature
        return (lt.exp() * (lt - ls)).sum(-1) * temperature**2

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ls, lt = ctx.saved_tensors
        # d/ds of T^2 * KL = T * (softmax(s/T) - softmax(t/T)): exactly 0 when s == t bit for bit
        return grad.unsqueeze(-1) * ctx.temperature * (ls.exp() - lt.exp()), None, None


def soft_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL with temperature per row of the last axis (Hinton et al.; scaled by T^2)."""
    return _SoftKL.apply(s.float(), t.float(), float(temperature))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token values ``(B, T)`` over real tokens."""
    if mask is None or x.ndim != 2 or mask.shape != x.shape:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def norm_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Token-wise MSE over the teacher's mean square (scale-free across layers and families)."""
    err = (s.float() - t.float()).pow(2).mean(-1)  # (B, T)
    scale = _masked_mean(t.float().pow(2).mean(-1), mask).clamp_min(1e-12).detach()
    return _masked_mean(err, mask) / scale


def cosine_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` per row, as ``0.5 * |s/|s| - t/|t||^2`` (identical inputs: exactly 0, zero grad)."""
    d = F.normalize(s.float(), dim=-1, eps=1e-12) - F.normalize(t.float(), dim=-1, eps=1e-12)
    return 0.5 * d.pow(2).sum(-1).mean()


def output_loss(s: Targets, t: Targets, temperature: float) -> torch.Tensor:
    """The family's output loss: KL with temperature on logits; cosine + normalised MSE on embeddings."""
    if s.kind != t.kind or s.output.shape != t.output.shape:
        raise ValueError(
            f"student output {s.kind} {tuple(s.output.shape)} does not match the teacher's "
            f"{t.kind} {tuple(t.output.shape)}"
        )
    if s.kind == "logits":
        kl = soft_kl(s.output, t.output, temperature)
        return _masked_mean(kl, s.mask if kl.ndim == 2 else None)
    return cosine_loss(s.output, t.output) + norm_mse(s.output, t.output, None)


def layer_loss(s: Targets, t: Targets, layer_map: list[int]) -> torch.Tensor:
    """Mean normalised MSE between student layer j's output and teacher layer ``layer_map[j]``'s."""
    assert s.layers is not None and t.layers is not None
    terms = [norm_mse(s.layers[j], t.layers[i], s.mask) for j, i in enumerate(layer_map)]
    return torch.stack(terms).mean()
