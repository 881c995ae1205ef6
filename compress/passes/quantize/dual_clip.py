"""RepQuant's learnable per-channel dual clipping of post-LayerNorm activations.

Each channel c gets a lower and an upper clipping bound (l_c, u_c); the per-channel quantizer is
s_c = (u_c - l_c) / (2^b - 1), z_c = round(-l_c / s_c). The bounds start from the per-channel
percentile/MSE search and are then learned: RepQuant says only that they are learnable
[paper abstract]; squeeze minimises the reconstruction error of the block the activation feeds,
``sum_j || FQ(X) W_j^T - X W_j^T ||^2`` over the consuming linears j, with Adam and a
straight-through estimator for the rounding (LSQ-style gradients reach l and u through the
scale and the clamp). ``symmetric=True`` ties l_c = -u_c (a norm without a bias, RMSNorm,
cannot absorb the zero-point shift of the reparameterization).
"""

from __future__ import annotations

import torch

from squeeze.compress.passes.quantize.uniform import Grid, search_range


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def _fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int) -> torch.Tensor:
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    s = ((hi - lo) / levels).clamp_min(1e-8)
    z = _ste_round(-lo / s)
    q = torch.clamp(_ste_round(x / s) + z, 0, levels)
    return (q - z) * s


def learn_bounds(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    bits: int,
    *,
    steps: int = 100,
    lr: float = 5e-3,
    symmetric: bool = False,
    max_tokens: int = 1024,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel clipping bounds (l, u) of activations ``x`` (N, C) feeding ``weights``.

    Args:
        x: calibration activations, one row per token.
        weights: the consuming linears' (out, C) weights.
        steps: Adam steps (0 keeps the percentile/MSE initialisation).
    Returns:
        (lo, hi), each (C,).
    """
    x = x.detach().float()
    if x.shape[0] > max_tokens:
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]
        x = x[idx]
    grid = Grid(bits, symmetric=False)
    lo0, hi0 = search_range(x.t(), grid, per_channel=True)
    if symmetric:
        m = torch.maximum(-lo0, hi0)
        lo0, hi0 = -m, m
    if steps <= 0:
        return lo0, hi0
    w = torch.cat([wi.detach().float() for wi in weights], dim=0)  # (sum out, C)
    target = x @ w.t()
    norm = target.pow(2).mean().clamp_min(1e-12)
    # Learn the bounds in units of their initial span, so one learning rate fits every layer.
    span = (hi0 - lo0).clamp_min(1e-6)
    a = torch.zeros_like(lo0, requires_grad=True)
    b = torch.zeros_like(hi0, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=lr)
    levels = grid.qmax
    best = (float("inf"), lo0, hi0)
    for _ in range(steps + 1):
        lo = lo0 + a * span
        hi = hi0 + b * span
        if symmetric:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        loss = (_fake_quant(x, lo, hi, levels) @ w.t() - target).pow(2).mean() / norm
        value = loss.item()
        if value < best[0]:
            best = (value, lo.detach().clone(), hi.detach().clone())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return best[1], best[2]
