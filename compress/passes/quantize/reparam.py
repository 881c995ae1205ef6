"""Scale reparameterization: per-channel activation quantization turned into per-tensor.

RepQ-ViT / RepQuant (channel-wise -> layer-wise), for an activation x with per-channel
quantizers (s_c, z_c) feeding linears W::

    s~ = mean_c s_c,  z~ = round(mean_c z_c),  r = s / s~,  delta_c = s~ (z~ - z_c)
    x' = x / r - delta                     (into the norm: gamma' = gamma / r, beta' = beta / r - delta)
    W' = W diag(r),  b' = b + W' delta     (the next linears)

so that W' x' + b' == W x + b, and quantizing x' per tensor with (s~, z~) gives *exactly* the
codes the per-channel quantizers give x: round(x'/s~) + z~ = round(x/s_c) + z_c because z~ and
z_c are integers. RepQ-ViT's code keeps z~ unrounded, which breaks that identity; squeeze rounds.

Smoothing (the ``--activations dynamic`` form): when ONNX Runtime picks the activation codes at
run time there are no per-channel codes to preserve, so only the scale part is used, with
SmoothQuant's migration strength: r_c = max|x_c|^alpha / max|W_c|^(1 - alpha), delta = 0. The
zero-point shift is left out on purpose: centring the inputs made every token's input large and
raised the weight-rounding error of MiniLM's FFN output layer ~10x (measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squeeze.compress.passes.quantize.uniform import Grid, params_from_range
from squeeze.compress.surgery import fold_into_consumer, fold_into_norm

__all__ = ["Reparam", "fold_into_consumer", "fold_into_norm", "from_channel_ranges", "smoothing"]


@dataclass
class Reparam:
    """x' = x / r - delta; consumers W' = W diag(r), b' = b + W' delta; x' quantized with (s, z)."""

    r: torch.Tensor  # (C,)
    delta: torch.Tensor  # (C,)
    scale: torch.Tensor  # () per-tensor scale s~ of x'
    zero: torch.Tensor  # () integer zero point z~ of x'


def from_channel_ranges(lo: torch.Tensor, hi: torch.Tensor, grid: Grid, symmetric: bool = False) -> Reparam:
    """RepQ reparameterization from per-channel bounds (l_c, u_c), with z~ rounded.

    ``symmetric`` (bounds l_c = -u_c): every channel gets the same zero point, the middle of the
    grid, so delta is exactly 0 (what a norm without a bias can absorb); computed, rounding can
    land on either side of .5 channel by channel.
    """
    dt = lo.dtype  # computed in float64, returned in the bounds' dtype
    s_c, z_c = params_from_range(lo.detach().double(), hi.detach().double(), grid)
    if symmetric:
        z_c = torch.full_like(z_c, float(round((grid.qmax + grid.qmin) / 2)))
    s_t = s_c.mean()
    z_t = torch.round(z_c.mean())
    r = s_c / s_t
    delta = s_t * (z_t - z_c)
    return Reparam(r=r.to(dt), delta=delta.to(dt), scale=s_t.to(dt), zero=z_t.to(dt))


def smoothing(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant factors r (x' = x / r), normalised to geometric mean 1; alpha = 0 gives ones."""
    if alpha == 0:
        return torch.ones_like(act_absmax)
    ax = act_absmax.float().clamp_min(1e-5)
    aw = weight_absmax.float().clamp_min(1e-5)
    r = ax.pow(alpha) / aw.pow(1 - alpha)
    r = r / r.log().mean().exp()
    return r.clamp(1e-3, 1e3)
