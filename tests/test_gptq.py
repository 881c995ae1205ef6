"""GPTQ (Frantar et al. 2022) and the range search: tests that fail on one-line bugs (issue 17).

More than 128 input columns, so the lazy cross-block update runs; the codes are checked against
the unblocked OBQ order computed here in float64.
"""

from __future__ import annotations

import torch

from squeeze.compress.passes.quantize import uniform
from squeeze.compress.passes.quantize.gptq import gptq, hessian
from squeeze.compress.passes.quantize.uniform import Grid

GPTQ_FLIPS = 2  # fp32 blocked GPTQ vs the float64 OBQ order, of 1200 codes; measured 0


def _gptq_problem(in_f: int = 300, out_f: int = 24, n: int = 600):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)  # correlated inputs
    x = torch.randn(n, in_f, generator=g) @ mix
    w = torch.randn(out_f, in_f, generator=g)
    grid = Grid(4, symmetric=False)
    s, z = uniform.weight_params(w, grid, "minmax")
    return w, x, s, z, grid


def test_gptq_codes_equal_across_block_sizes_on_more_than_128_columns():
    """300 columns: block 128 spans three blocks, so the lazy cross-block update runs.
    Catches: the update of the columns after a block (``w[:, i2:] -= err1 @ hinv[i1:i2, i2:]``)
    dropped or mis-sliced, the in-block update starting at j + 1."""
    w, x, s, z, grid = _gptq_problem()
    h = hessian(x)
    ref = gptq(w, h, s, z, grid, block=300)  # one block: no lazy update at all
    for block in (128, 64, 37):
        codes = gptq(w, h, s, z, grid, block=block)
        assert torch.equal(codes, ref), block  # measured: 0 of 7200 codes differ at 128, 64, 37
    rtn = uniform.quantize_weight(w, s, z, grid)
    assert (ref != rtn).float().mean() > 0.2  # GPTQ moves codes off round-to-nearest: measured 26%

    def err(c):
        return float(
            (x @ (uniform.dequantize(c, uniform.expand_blocks(s, 300), uniform.expand_blocks(z, 300)) - w).t())
            .pow(2)
            .mean()
        )

    assert err(ref) < 0.8 * err(rtn)  # measured 0.49x


def _obq_reference(w, h, s, z, grid, damp=0.01):
    """GPTQ's codes the slow way (OBQ order, float64): round column i, spread its error over the
    later columns with the inverse Hessian, then remove i from the inverse (Schur complement)."""
    w, h = w.double().clone(), h.double().clone()
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    s, z = uniform.expand_blocks(s, w.shape[1]).double(), uniform.expand_blocks(z, w.shape[1]).double()
    codes = torch.zeros_like(w)
    for i in range(w.shape[1]):
        codes[:, i] = torch.clamp(torch.round(w[:, i] / s[:, i]) + z[:, i], grid.qmin, grid.qmax)
        err = (w[:, i] - (codes[:, i] - z[:, i]) * s[:, i]) / hinv[i, i]
        w[:, i + 1 :] -= err[:, None] * hinv[i, i + 1 :][None, :]
        hinv -= hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return codes.float()


def test_gptq_equals_the_unblocked_obq_order():
    """Catches: the error not divided by the inverse Hessian's diagonal, a wrong Cholesky side."""
    w, x, s, z, grid = _gptq_problem(in_f=150, out_f=8, n=400)
    codes = gptq(w, hessian(x), s, z, grid)
    assert int((codes != _obq_reference(w, hessian(x), s, z, grid)).sum()) <= GPTQ_FLIPS


def test_percentile_search_beats_minmax_on_an_outlier_tensor():
    """4-bit grid, one value 60 in a row of N(0, 1): the search must leave min/max for a percentile pair with a strictly
    lower error. Catches: the comparison reversed, the candidates' errors not tracked per row."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4096, generator=g)
    x[1, 7] = 60.0
    grid = Grid(4, symmetric=False)
    lo, hi = uniform.search_range(x, grid, per_channel=True)
    mlo, mhi = uniform.minmax_range(x, per_channel=True)

    def mse(a, b):
        s, z = uniform.params_from_range(a, b, grid)
        return (uniform.fake_quant(x, s[:, None], z[:, None], grid) - x).pow(2).mean(1)

    assert float(hi[1]) < 60.0
    assert bool((mse(lo, hi) < 0.9 * mse(mlo, mhi)).all())  # measured 0.60-0.75x on the 4 rows
