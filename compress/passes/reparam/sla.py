"""SLAB's simplified linear attention (SLA) for ViT-style encoders.

Per head (heads folded into the batch)::

    Q = ReLU(X Wq + bq)          K = ReLU(X Wk + bk + P)      V = X Wv + bv
    O = Q (K^T V) / (Q (K^T 1) + 1e-6) + DWC(V)
    Y = concat_heads(O) Wo + bo

``P`` (1, N, C) is a learnable positional term on K (zero at the start), DWC a depth-wise 5x5
convolution over the patch grid shared by all heads. No softmax and no mask. Computed in fp32.
The product is taken in the cheaper order (``Q (K^T V)`` when N is large, ``(Q K^T) V``
otherwise); both are the same function. SLAB's DeiT has no class token; here the special tokens
in front of the patches (ViT's CLS, DeiT's distillation token) take part in the attention but
get no DWC term, since they have no place on the grid.
"""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family

Order = Literal["auto", "linear", "quadratic"]
EPS = 1e-6  # SLAB's row-normaliser epsilon


def sla_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, order: Order = "auto") -> torch.Tensor:
    """Row-normalised kernel attention of (BH, N, c) q, k and (BH, N, d) v (kernels applied)."""
    n, c, d = q.shape[-2], q.shape[-1], v.shape[-1]
    z = 1.0 / (q @ k.sum(dim=-2).unsqueeze(-1) + EPS)  # (BH, N, 1)
    if order == "auto":
        order = "linear" if n * n * (c + d) > c * d * 2 * n else "quadratic"
    if order == "linear":
        return (q @ (k.transpose(-2, -1) @ v)) * z  # (BH, N, c) @ (BH, c, d)
    return ((q @ k.transpose(-2, -1)) @ v) * z  # (BH, N, N) @ (BH, N, d)


class SimplifiedLinearAttention(nn.Module):
    """Drop-in for a ViT attention module: same projections (under the same attribute names),
    plus ``positional_encoding`` and ``dwc``. Returns ``(output, None)`` like the module it replaces.

    Args:
        projections: {attribute name: module} for q, k, v, out, in that order.
        heads: number of heads; tokens: N (special tokens + grid * grid); grid: patches per side.
    """

    def __init__(self, projections: dict[str, nn.Module], heads: int, tokens: int, grid: int, kernel: int = 5):
        super().__init__()
        self.names = tuple(projections)
        for name, mod in projections.items():
            self.add_module(name, mod)
        q = projections[self.names[0]]
        dim = cast(torch.Tensor, q.weight).shape[0]
        self.heads, self.head_dim, self.tokens, self.grid = heads, dim // heads, tokens, grid
        self.positional_encoding = nn.Parameter(torch.zeros(1, tokens, dim))
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel, padding=kernel // 2, groups=self.head_dim)
        self.order: Order = "auto"

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        b, n, _ = hidden_states.shape  # (B, N, C)
        pq, pk, pv, po = (getattr(self, name) for name in self.names)
        x = hidden_states.float()
        q = F.relu(pq(x))
        k = F.relu(pk(x) + self.positional_encoding)
        v = pv(x)
        h, d = self.heads, self.head_dim
        q, k, v = (t.reshape(b, n, h, d).transpose(1, 2).reshape(b * h, n, d) for t in (q, k, v))  # (BH, N, d)
        out = sla_core(q, k, v, self.order)
        g = self.grid
        special = n - g * g
        grid = v[:, special:].transpose(1, 2).reshape(b * h, d, g, g)  # row-major patches
        local = self.dwc(grid).reshape(b * h, d, g * g).transpose(1, 2)  # (BH, g*g, d)
        out = out + F.pad(local, (0, 0, special, 0))
        out = out.reshape(b, h, n, d).transpose(1, 2).reshape(b, n, h * d)
        return po(out.to(hidden_states.dtype)), None

    def extra_repr(self) -> str:
        return f"heads={self.heads}, tokens={self.tokens}, grid={self.grid}x{self.grid}"


def token_grid(tokens: int) -> int:
    """Patches per side of a ViT sequence of ``tokens`` (a square grid plus a few special tokens)."""
    g = math.isqrt(tokens)
    if g < 1 or tokens - g * g > 2 * g:
        raise SqueezeError(f"SLA needs a square patch grid; a sequence of {tokens} tokens is not one")
    return g


def count_tokens(family: Family, model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """N, the sequence length the transformer layers see for ``batch``."""
    seen: dict[str, int] = {}

    def hook(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        seen.setdefault("n", int(x.shape[1]))

    handle = family.layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**{k: v[:1] for k, v in batch.items() if k != "labels"})
    finally:
        handle.remove()
    return seen["n"]


def swap_attention(family: Family, model: nn.Module, tokens: int, grid: int, kernel: int = 5) -> list[int]:
    """Replace every (kept) attention sublayer by SLA around its own projections; the layers."""
    attn_path = family.role_path("attn")
    names = []
    for role in ("q", "k", "v", "attn_out"):
        path = family.role_path(role)
        if not isinstance(path, str) or not isinstance(attn_path, str) or not path.startswith(attn_path + "."):
            raise SqueezeError(
                f"SLA needs separate q, k, v and output projections inside the attention module; "
                f"{family.name} does not have them"
            )
        names.append(path[len(attn_path) + 1 :])
    heads = family.num_heads(model.config)
    done = []
    for i, layer in enumerate(family.layers(model)):
        if family.is_skipped(layer, "attn"):
            continue
        attn = family.role(layer, "attn")
        projections = {n: attn.get_submodule(n) for n in names}
        family.set_role(layer, "attn", SimplifiedLinearAttention(projections, heads, tokens, grid, kernel))
        done.append(i)
    return done
