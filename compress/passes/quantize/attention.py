"""Quantized attention, plugged in through transformers' attention-function interface.

With static activations the matmuls inside attention get quantized inputs too: Q, K and V per
tensor (uniform, ``quant_dequant``) and the softmax probabilities with the log-sqrt2 quantizer
(``squeeze::LogSqrt2Softmax``, kept as one node in the ONNX graph) - or, for the plain
baselines, a uniform quantizer over [0, max]. The attention scores (QK^T plus the additive
mask) stay float: the mask holds -3.4e38 at padded positions, which is why naive static QDQ of
BERT collapses (cosine 0.33); nothing in squeeze ever quantizes it.

Each attention module that receives the call (the one owning q/k/v, see
``Family.attention_core``) gets an :class:`AttnQuant` child holding its scales. The function is
registered under :data:`NAME` by :func:`route`.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

import squeeze.kernels.registry  # noqa: F401  (registers the torch.ops.squeeze operators)
from squeeze.compress.passes.quantize.uniform import Grid, minmax_range, params_from_range, search_range
from squeeze.kernels.logsqrt2_softmax import search_scale

NAME = "squeeze_quant"
CHILD = "squeeze_quant"  # attribute name of the AttnQuant child on the attention module


class AttnQuant(nn.Module):
    """Quantizer state of one attention module (buffers: what the checkpoint stores)."""

    q_scale: torch.Tensor  # buffers (register_buffer)
    q_zero: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    p_scale: torch.Tensor
    p_zero: torch.Tensor

    def __init__(self, bits: int, softmax: str):
        super().__init__()
        self.bits, self.softmax = bits, softmax  # softmax: "logsqrt2" | "uniform"
        zdt = torch.uint8 if bits <= 8 else torch.int32  # uint8 is ONNX's container
        for name in ("q", "k", "v", "p"):
            self.register_buffer(f"{name}_scale", torch.ones(()))
            self.register_buffer(f"{name}_zero", torch.zeros((), dtype=zdt))
        self.observing = False
        self.seen: dict[str, list[torch.Tensor]] = {}

    def observe(self, name: str, t: torch.Tensor, max_values: int = 1 << 20) -> None:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // max_values)
        self.seen.setdefault(name, []).append(flat[::step].float())

    def calibrate(self, method: str) -> None:
        """Set every scale from what :meth:`observe` recorded, then forget it."""
        grid = Grid(self.bits, symmetric=False)
        with torch.no_grad():
            for name in ("q", "k", "v"):
                x = torch.cat(self.seen[name])
                lo, hi = search_range(x, grid) if method != "minmax" else minmax_range(x)
                s, z = params_from_range(lo, hi, grid)
                getattr(self, f"{name}_scale").copy_(s)
                getattr(self, f"{name}_zero").copy_(z.to(self.q_zero.dtype))
            p = torch.cat(self.seen["p"])
            if self.softmax == "logsqrt2":
                self.p_scale.fill_(search_scale(p, self.bits))
            else:
                lo, hi = search_range(p, grid) if method != "minmax" else minmax_range(p)
                s, z = params_from_range(torch.zeros(()), hi, grid)
                self.p_scale.copy_(s)
                self.p_zero.copy_(z.to(self.p_zero.dtype))
        self.seen = {}
        self.observing = False

    def extra_repr(self) -> str:
        return f"bits={self.bits}, softmax={self.softmax}"


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with quantized operands. q, k, v: (B, H, T, D) (k, v may have fewer heads)."""
    st: AttnQuant | None = getattr(module, CHILD, None)
    if key.shape[1] != query.shape[1]:  # grouped-query attention: share each k/v head
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    ops = torch.ops.squeeze
    qs = st if st is not None and not st.observing else None  # quantize the operands
    if st is not None and st.observing:
        for name, t in (("q", query), ("k", key), ("v", value)):
            st.observe(name, t)
    if qs is not None:
        query = ops.quant_dequant(query, qs.q_scale, qs.q_zero, qs.bits)
        key = ops.quant_dequant(key, qs.k_scale, qs.k_zero, qs.bits)
        value = ops.quant_dequant(value, qs.v_scale, qs.v_zero, qs.bits)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, T, S), float
    if attention_mask is not None:
        scores = scores + attention_mask
    if qs is not None and qs.softmax == "logsqrt2":
        probs = ops.logsqrt2_softmax(scores, qs.p_scale, qs.bits)
    else:
        probs = torch.softmax(scores, dim=-1)
        if st is not None and st.observing:
            st.observe("p", probs)
        if qs is not None:
            probs = ops.quant_dequant(probs, qs.p_scale, qs.p_zero, qs.bits)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, T, H, D)
    return out, probs


def route(model: nn.Module) -> None:
    """Route every attention layer of ``model`` through :func:`attention` (transformers'
    AttentionInterface, registered under :data:`NAME`), with eager-style additive float masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    cast(Any, model).set_attn_implementation(NAME)  # a transformers PreTrainedModel
