"""GPTQ weight rounding (Frantar et al. 2022), the default weight rounding of ``--method repquant``.

Given a linear's weight W (out, in) on a fixed grid (per-channel or per-block scales chosen
beforehand) and the Hessian proxy H = X^T X of its calibration inputs, the columns are rounded
one at a time and each column's rounding error is spread over the not-yet-rounded columns with
the inverse Hessian, so that ||X W^T - X W_hat^T|| is (greedily) minimal rather than
||W - W_hat||. Lazy batch updates in blocks of 128 columns; dampening 1% of the mean diagonal.
RepQuant's "quantized weight reconstruction" is [unverified] beyond its abstract; GPTQ on the
reparameterized weights W' is squeeze's reading of it (ALGORITHMS.md section 4).
"""

from __future__ import annotations

import torch

from squeeze.compress.passes.quantize.uniform import Grid, expand_blocks


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = X^T X / n (float64) from inputs x (..., in)."""
    x = x.reshape(-1, x.shape[-1]).double()
    return x.t() @ x / max(1, x.shape[0])


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    grid: Grid,
    damp: float = 0.01,
    block: int = 128,
) -> torch.Tensor:
    """Integer codes (float tensor, (out, in)) of ``w`` chosen by GPTQ.

    Args:
        w: (out, in) weight.
        h: (in, in) Hessian proxy of the inputs.
        scale, zero: (out, blocks) grid parameters (fixed; they are not re-fit per group).
    """
    _, in_f = w.shape
    s, z = expand_blocks(scale, in_f), expand_blocks(zero, in_f)  # (out, in)
    w = w.detach().clone().float()
    h = h.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(in_f, dtype=h.dtype)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    except torch.linalg.LinAlgError:  # numerically singular even after dampening: round to nearest
        return torch.clamp(torch.round(w / s) + z, grid.qmin, grid.qmax)
    codes = torch.zeros_like(w)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hb = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = w1[:, j]
            q = torch.clamp(torch.round(col / s[:, i1 + j]) + z[:, i1 + j], grid.qmin, grid.qmax)
            codes[:, i1 + j] = q
            deq = (q - z[:, i1 + j]) * s[:, i1 + j]
            e = (col - deq) / hb[j, j]
            w1[:, j:] -= e[:, None] * hb[j, j:][None, :]
            err1[:, j] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes
