"""Skipping a sublayer: the stand-ins that replace a dropped residual branch, and the per-family
skip operations that install them (``Family.skip``; called through ``Family.skip_sublayer``)."""

from __future__ import annotations

from typing import Literal, Protocol, cast

import torch
from torch import nn

from squeeze.compress.errors import SqueezeError

Sublayer = Literal["attn", "mlp"]


class Family(Protocol):
    """What a skip operation needs of its family (the Family record in family.py has it; a
    protocol here keeps the import pointing one way)."""

    name: str
    attn_returns_tuple: bool

    def role(self, layer: nn.Module, role: str) -> object: ...

    def set_role(self, layer: nn.Module, role: str, module: nn.Module) -> None: ...


# --------------------------------------------------------------------------------------------
# Stand-ins for a dropped sublayer. Each makes the residual branch contribute exactly nothing,
# so h_out == h_in bit for bit (x + 0.0 == x in IEEE arithmetic).
# --------------------------------------------------------------------------------------------


class ZeroBranch(nn.Module):
    """A dropped pre-norm sublayer: returns zeros shaped like its input.

    Args:
        returns_tuple: attention modules return ``(output, weights)``; MLPs return a tensor.
    """

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.returns_tuple else zeros


class PassThroughAttention(nn.Module):
    """A dropped post-LN attention block (BERT): the block's output is its input.

    With ``norm`` set, the block keeps its LayerNorm: output = LN(input).
    """

    def __init__(self, norm: nn.Module | None = None):
        super().__init__()
        self.norm = norm

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states if self.norm is None else self.norm(hidden_states)
        return out, None


class PassThroughOutput(nn.Module):
    """A dropped post-LN MLP (BERT ``output`` module): returns the residual input."""

    def __init__(self, norm: nn.Module | None = None):
        super().__init__()
        self.norm = norm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return input_tensor if self.norm is None else self.norm(input_tensor)


STAND_INS = (ZeroBranch, PassThroughAttention, PassThroughOutput)


def skip_pre_norm(fam: Family, layer: nn.Module, which: Sublayer, keep_norm: bool) -> None:
    if keep_norm:
        raise SqueezeError(f"{fam.name} is a pre-norm family: a dropped sublayer takes its norm with it")
    norm_role = "attn_norm" if which == "attn" else "mlp_norm"
    fam.set_role(layer, norm_role, nn.Identity())
    fam.set_role(layer, which, ZeroBranch(returns_tuple=(which == "attn" and fam.attn_returns_tuple)))


def skip_bert(fam: Family, layer: nn.Module, which: Sublayer, keep_norm: bool) -> None:
    # BERT: attention = self-attention + output(dense, LayerNorm(x + h)); mlp = intermediate +
    # output(dense, LayerNorm(x + h)). Skipping replaces the whole block, LN optionally kept.
    if which == "attn":
        norm = cast(nn.Module, fam.role(layer, "attn_norm")) if keep_norm else None
        layer.attention = PassThroughAttention(norm)
    else:
        norm = cast(nn.Module, fam.role(layer, "mlp_norm")) if keep_norm else None
        layer.intermediate = nn.Identity()
        layer.output = PassThroughOutput(norm)


def skip_post_zero(fam: Family, layer: nn.Module, which: Sublayer, keep_norm: bool) -> None:
    # DistilBERT: norm(branch(x) + x) with the branch a module of its own: the branch returns
    # zeros and its norm becomes an identity (kept with keep_norm: output = LN(x)).
    if not keep_norm:
        fam.set_role(layer, "attn_norm" if which == "attn" else "mlp_norm", nn.Identity())
    fam.set_role(layer, which, ZeroBranch(returns_tuple=(which == "attn")))
