"""Uniform quantizers and the range searches that pick their (scale, zero point).

Asymmetric (activations, RepQ-ViT's weights): ``q = clamp(round(x / s) + z, 0, 2^b - 1)``,
``x_hat = (q - z) * s`` with ``s = (hi - lo) / (2^b - 1)`` and ``z = round(-lo / s)``.
Symmetric (signed codes, zero point 0, what ONNX Runtime's integer kernels and TensorRT want for
weights): ``q = clamp(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1)``, ``s = max(|lo|, |hi|) / (2^(b-1) - 1)``.

Ranges come from min/max, or from RepQ-ViT's search: the percentile pairs (1-p, p) for
p in {0.999, 0.9999, 0.99999} (plus min/max itself), keeping the pair with the lowest mean
squared reconstruction error - per tensor, or per output channel for weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PERCENTILES = (0.999, 0.9999, 0.99999)
_MAX_QUANTILE = 1 << 22  # torch.quantile refuses very large inputs; a strided sample keeps the tails


@dataclass(frozen=True)
class Grid:
    """The integer grid of one quantizer."""

    bits: int
    symmetric: bool

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def weight_grid(bits: int) -> Grid:
    """Symmetric int8 weights (zero point 0: what ORT's integer kernels and TensorRT expect);
    below 8 bits an asymmetric grid (no integer kernel consumes those, and it wastes no level)."""
    return Grid(bits, symmetric=bits >= 8)


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) covering [lo, hi] (widened to include 0); zero point as a float tensor."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if grid.symmetric:
        scale = torch.maximum(-lo, hi) / grid.qmax
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / grid.qmax
        scale = torch.clamp(scale, min=1e-12)
        zero = torch.clamp(torch.round(-lo / scale), grid.qmin, grid.qmax)
    scale = torch.clamp(scale, min=1e-12)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Integer codes (as a float tensor) of ``x``; rounding half to even, like ONNX."""
    return torch.clamp(torch.round(x / scale) + zero, grid.qmin, grid.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    return dequantize(quantize(x, scale, zero, grid), scale, zero)


def _sample(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    if flat.numel() > _MAX_QUANTILE:
        flat = flat[:: math.ceil(flat.numel() / _MAX_QUANTILE)]
    return flat


def minmax_range(x: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) per tensor, or per row (dim 0) when ``per_channel``."""
    x = x.detach().float()
    if per_channel:
        flat = x.reshape(x.shape[0], -1)
        return flat.amin(1), flat.amax(1)
    return x.amin(), x.amax()


def search_range(
    x: torch.Tensor, grid: Grid, per_channel: bool = False, percentiles: tuple[float, ...] = PERCENTILES
) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT's range search: min/max and each percentile pair, lowest MSE wins.

    Args:
        x: a tensor; with ``per_channel`` its rows (dim 0) are searched independently.
    Returns:
        (lo, hi): scalars, or one per row.
    """
    x = x.detach().float()
    rows = x.reshape(x.shape[0], -1) if per_channel else _sample(x).reshape(1, -1)
    candidates = [(rows.amin(1), rows.amax(1))]
    for p in percentiles:
        qs = torch.quantile(rows, torch.tensor([1 - p, p]), dim=1)  # (2, rows)
        candidates.append((qs[0], qs[1]))
    best_lo, best_hi = candidates[0]
    best_err = torch.full_like(best_lo, math.inf)
    for lo, hi in candidates:
        s, z = params_from_range(lo, hi, grid)
        err = (fake_quant(rows, s[:, None], z[:, None], grid) - rows).pow(2).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return (best_lo, best_hi) if per_channel else (best_lo[0], best_hi[0])


def weight_params(w: torch.Tensor, grid: Grid, method: str, blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (or per (channel, block)) scales and zero points of an (out, in) weight.

    Returns:
        (scale, zero) of shape (out, blocks).
    """
    out_f, in_f = w.shape
    rows = w.detach().float().reshape(out_f * blocks, in_f // blocks)
    lo, hi = (
        search_range(rows, grid, per_channel=True) if method in ("percentile", "repquant") else minmax_range(rows, True)
    )
    s, z = params_from_range(lo, hi, grid)
    return s.view(out_f, blocks), z.view(out_f, blocks)


def expand_blocks(p: torch.Tensor, in_f: int) -> torch.Tensor:
    """(out, blocks) -> (out, in): each block's value repeated over its columns."""
    return p.repeat_interleave(in_f // p.shape[1], dim=1)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Integer codes (float tensor) of an (out, in) weight, round to nearest."""
    in_f = w.shape[1]
    return quantize(w.float(), expand_blocks(scale, in_f), expand_blocks(zero, in_f), grid)
