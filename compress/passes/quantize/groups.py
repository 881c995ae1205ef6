"""Per-layer input groups and the per-group decisions: transform, activation quantizer, weights.

A *group* is the set of linears that read the same tensor: attention input (q, k, v or a fused
qkv), attention output, MLP input (one linear, or gate + up), MLP output. Each group chooses:

* a transform of its input (none, a smoothing scale, or the RepQuant reparameterization), and
  where it lives: folded into the input norm (pre-norm families), into the producing linear
  (v -> attention output, when every head has its own v), or an explicit ``ChannelAffine``;
* the input's quantizer (dynamic, or static per-tensor / per-block scale and zero point);
* each linear's integer weights (GPTQ or round-to-nearest on a per-channel / per-block grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from squeeze.compress.passes.quantize import dual_clip, reparam, uniform
from squeeze.compress.passes.quantize.gptq import gptq, hessian
from squeeze.compress.passes.quantize.uniform import Grid, weight_grid
from squeeze.kernels.dynamic_qlinear import dynamic_quantize_u8


@dataclass
class Group:
    """Linears of one layer that read the same tensor."""

    name: str  # attn_in | attn_out | mlp_in | mlp_out
    keys: list[str]
    modules: list[nn.Module]
    norm: nn.Module | None = None  # a norm that feeds only this group (foldable)
    producer: tuple[nn.Module, slice] | None = None  # (linear, its output rows) producing the input

    @property
    def first(self) -> nn.Module:
        return self.modules[0]


@dataclass
class Decision:
    """What a group ends up with (enough to build its QuantLinears)."""

    r: torch.Tensor | None = None  # x' = x / r - delta
    delta: torch.Tensor | None = None
    where: str = "none"  # none | norm | producer | affine
    a_scale: torch.Tensor | None = None
    a_zero: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


def sample_rows(x: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """At most ``limit`` rows of ``x``, drawn with a fixed seed."""
    if x.shape[0] <= limit:
        return x
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]]


def consumer_weights(group: Group, linear_weight) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(out, in) weight and bias of each linear of the group, as float tensors."""
    return [
        (linear_weight(m).detach().float(), None if m.bias is None else cast(torch.Tensor, m.bias).detach().float())
        for m in group.modules
    ]


def round_weight(
    w: torch.Tensor, x: torch.Tensor | None, bits: int, blocks: int, method: str, use_gptq: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero) of an (out, in) weight; GPTQ when ``use_gptq`` and inputs are given."""
    grid = weight_grid(bits)
    scale, zero = uniform.weight_params(w, grid, "minmax" if method in ("minmax", "bct") else "percentile", blocks)
    if use_gptq and x is not None:
        codes = gptq(w, hessian(x), scale, zero, grid)
    else:
        codes = uniform.quantize_weight(w, scale, zero, grid)
    return codes, scale, zero


def smoothing_search(
    batches: list[torch.Tensor],
    weights: list[tuple[torch.Tensor, torch.Tensor | None]],
    w_bits: int,
    alphas: tuple[float, ...],
    max_rows: int,
) -> tuple[torch.Tensor, float, dict]:
    """Pick the SmoothQuant strength alpha with the lowest output error under ONNX Runtime's
    dynamic quantization (per-tensor uint8 input, per-channel int weights, round to nearest).

    Args:
        batches: calibration inputs per run, (rows, C) each, padding included: the run-time range
            is taken over a whole batch, and padding tokens can hold the largest values.
    Returns:
        (r, alpha, relative error per alpha).
    """
    act_max = torch.stack([b.abs().amax(0) for b in batches]).amax(0)
    w_max = torch.stack([w.abs().amax(0) for w, _ in weights]).amax(0)
    step = max(1, sum(b.shape[0] for b in batches) // max_rows)
    rows = [b[::step] for b in batches]  # thin each batch, keep its own dynamic range
    targets = [[x @ w.t() for x in rows] for w, _ in weights]
    grid = weight_grid(w_bits)
    errors = {}
    best = (math.inf, torch.ones_like(act_max), 0.0)
    for a in alphas:
        r = reparam.smoothing(act_max, w_max, a)
        xq = [(_dyn_range_fake_quant(b / r, x / r)) for b, x in zip(batches, rows)]
        err = 0.0
        for (w, _), ts in zip(weights, targets):
            ws = w * r[None, :]
            s, z = uniform.weight_params(ws, grid, "minmax")
            wq = uniform.dequantize(uniform.quantize_weight(ws, s, z, grid), s, z)
            num = sum(float((x @ wq.t() - t).pow(2).sum()) for x, t in zip(xq, ts))
            err += num / max(sum(float(t.pow(2).sum()) for t in ts), 1e-12)
        errors[a] = err
        if err < best[0]:
            best = (err, r, a)
    return best[1], best[2], errors


def _dyn_range_fake_quant(full: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Fake-quantize ``x`` with the dynamic (uint8) range ORT would take from ``full``."""
    _, s, z = dynamic_quantize_u8(full)
    return (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s


def dynamic_fake_quant(x: torch.Tensor) -> torch.Tensor:
    q, s, z = dynamic_quantize_u8(x)
    return (q - z) * s


def repquant_reparam(
    x: torch.Tensor,
    weights: list[tuple[torch.Tensor, torch.Tensor | None]],
    a_bits: int,
    clip_steps: int,
    symmetric: bool,
    seed: int,
) -> tuple[reparam.Reparam, dict]:
    """Learned per-channel dual clipping, then the reparameterization with z~ rounded."""
    lo, hi = dual_clip.learn_bounds(
        x, [w for w, _ in weights], a_bits, steps=clip_steps, symmetric=symmetric, seed=seed
    )
    rp = reparam.from_channel_ranges(lo, hi, Grid(a_bits, symmetric=False), symmetric=symmetric)
    return rp, {"r_min": float(rp.r.min()), "r_max": float(rp.r.max()), "zero": int(rp.zero)}


def static_range(x: torch.Tensor, bits: int, method: str, blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (or per-block, as per-channel vectors) activation scale and zero point."""
    grid = Grid(bits, symmetric=False)
    if blocks > 1:
        c = x.shape[1]
        cols = x.t().reshape(blocks, -1)  # (blocks, C/blocks * N)
        lo, hi = uniform.minmax_range(cols, per_channel=True)
        s, z = uniform.params_from_range(lo, hi, grid)
        return s.repeat_interleave(c // blocks), z.repeat_interleave(c // blocks)
    lo, hi = uniform.minmax_range(x) if method in ("minmax", "bct") else uniform.search_range(x, grid)
    return uniform.params_from_range(lo, hi, grid)
