"""The quantization algorithms' exact invariants (ALGORITHMS.md section 4), on plain tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from squeeze.compress.passes.quantize import dual_clip, reparam, uniform
from squeeze.compress.passes.quantize.gptq import gptq, hessian
from squeeze.compress.passes.quantize.modules import ChannelAffine
from squeeze.compress.passes.quantize.uniform import Grid
from squeeze.kernels.logsqrt2_softmax import (
    logsqrt2_codes,
    logsqrt2_dequantize,
    logsqrt2_dequantize_shift,
    logsqrt2_matmul_shift,
    search_scale,
)

REPARAM_FP_TOL = 1e-6  # float64 LayerNorm -> linear before / after folding; measured 4e-15
SHIFT_FORM_TOL = 1e-12  # float64 shift form vs s * 2^(-q/2); measured 2e-16


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [8, 6, 4])
def test_quantize_dequantize_is_idempotent(bits, symmetric):
    x = torch.randn(64, 33, generator=_gen()) * 3
    grid = Grid(bits, symmetric)
    lo, hi = uniform.search_range(x, grid, per_channel=True)
    s, z = uniform.params_from_range(lo, hi, grid)
    once = uniform.fake_quant(x, s[:, None], z[:, None], grid)
    twice = uniform.fake_quant(once, s[:, None], z[:, None], grid)
    assert torch.equal(once, twice)
    assert not torch.equal(once, x)


@pytest.mark.parametrize("bits,blocks", [(8, 1), (4, 1), (4, 4)])
def test_dequantized_weights_lie_on_the_grid(bits, blocks):
    w = torch.randn(24, 32, generator=_gen(1))
    x = torch.randn(200, 32, generator=_gen(2))
    grid = uniform.weight_grid(bits)
    s, z = uniform.weight_params(w, grid, "percentile", blocks)
    for codes in (uniform.quantize_weight(w, s, z, grid), gptq(w, hessian(x), s, z, grid)):
        assert torch.equal(codes, torch.round(codes))
        assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
        w_hat = (codes - uniform.expand_blocks(z, 32)) * uniform.expand_blocks(s, 32)
        back = w_hat / uniform.expand_blocks(s, 32) + uniform.expand_blocks(z, 32)
        assert torch.allclose(back, torch.round(back), atol=1e-4)


def test_percentile_search_picks_each_rows_lowest_error_candidate():
    """Per row, the search returns the candidate (min/max or a percentile pair) with the lowest
    MSE, recomputed here by brute force: the outlier row clips (strictly better than min/max by
    half), the uniform row keeps its min/max. Catches: the comparison inverted (keeps the worst),
    rows mixed up, a percentile pair not symmetric (1 - p, p), min/max returned unconditionally."""
    g = _gen(3)
    x = torch.stack([torch.randn(4000, generator=g), torch.rand(4000, generator=g) * 2 - 1])
    x[0, 0] = 12.0  # one outlier wastes most of a 4-bit min/max grid
    grid = Grid(4, symmetric=False)
    lo, hi = uniform.search_range(x, grid, per_channel=True)

    def mse(row, lo_, hi_):
        return float((uniform.fake_quant(row, *uniform.params_from_range(lo_, hi_, grid), grid) - row).pow(2).mean())

    for i, row in enumerate(x):
        cands = [(row.min(), row.max())] + [
            tuple(torch.quantile(row, torch.tensor([1 - p, p]))) for p in uniform.PERCENTILES
        ]
        errs = [mse(row, *c) for c in cands]
        best = min(range(len(cands)), key=errs.__getitem__)
        assert (float(lo[i]), float(hi[i])) == pytest.approx((float(cands[best][0]), float(cands[best][1])))
    assert float(hi[0]) < 12.0 and mse(x[0], lo[0], hi[0]) < 0.5 * mse(x[0], x[0].min(), x[0].max())
    assert (float(lo[1]), float(hi[1])) == (float(x[1].min()), float(x[1].max()))


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    g = _gen(4)
    base = torch.randn(512, 8, generator=g)
    x = base @ torch.randn(8, 64, generator=g) + 0.05 * torch.randn(512, 64, generator=g)  # low-rank inputs
    w = torch.randn(32, 64, generator=g)
    grid = uniform.weight_grid(4)
    s, z = uniform.weight_params(w, grid, "minmax")

    def err(c):
        return float((x @ ((c - z) * s).t() - x @ w.t()).pow(2).mean())

    assert err(gptq(w, hessian(x), s, z, grid)) < 0.7 * err(uniform.quantize_weight(w, s, z, grid))


# ----------------------------------------------------------------------------- log-sqrt2


def test_logsqrt2_dequantization_equals_power_form_and_shift_form():
    a = torch.rand(4, 7, 9, generator=_gen(5), dtype=torch.float64).softmax(-1)
    a[0, 0, 0] = 0.0  # exact zeros become code +inf -> 0
    for bits in (3, 4, 8):
        s = search_scale(a.float(), bits)
        q = logsqrt2_codes(a, s)
        finite = q < 2**bits
        power = torch.where(finite, s * torch.pow(2.0, -q / 2), torch.zeros_like(a))
        assert torch.equal(logsqrt2_dequantize(q, s, bits), power)
        assert torch.allclose(logsqrt2_dequantize_shift(q, s, bits), power, rtol=0, atol=SHIFT_FORM_TOL)
        assert bool((logsqrt2_dequantize(q, s, bits)[~finite] == 0).all())


def test_logsqrt2_shift_matmul_equals_dequantized_matmul():
    a = torch.rand(2, 6, 6, generator=_gen(6), dtype=torch.float64).softmax(-1)
    v = torch.randn(2, 6, 5, generator=_gen(7), dtype=torch.float64)
    q = logsqrt2_codes(a, 1.0)
    want = logsqrt2_dequantize(q, 1.0, 4) @ v
    assert torch.allclose(logsqrt2_matmul_shift(q, v, 1.0, 4), want, rtol=0, atol=SHIFT_FORM_TOL)


def test_logsqrt2_codes_are_the_rounded_log():
    a = torch.tensor([1.0, 0.5, 0.25, 2**-0.5, 1e-9])
    q = logsqrt2_codes(a, 1.0)
    assert q.tolist()[:4] == [0.0, 2.0, 4.0, 1.0]
    assert q[4] == torch.round(-2 * torch.log2(torch.tensor(1e-9)))


# ----------------------------------------------------------------------------- reparameterization


def _ln_linear(c: int = 16, out: int = 12, seed: int = 8) -> tuple[nn.LayerNorm, nn.Linear]:
    g = _gen(seed)
    ln = nn.LayerNorm(c).double()
    lin = nn.Linear(c, out).double()
    with torch.no_grad():
        ln.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 3 + 0.1)
        ln.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        lin.weight.copy_(torch.randn(out, c, generator=g, dtype=torch.float64))
        lin.bias.copy_(torch.randn(out, generator=g, dtype=torch.float64))
    return ln, lin


def _channel_codes(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> torch.Tensor:
    s, z = uniform.params_from_range(lo, hi, grid)
    return uniform.quantize(x, s, z, grid)


@pytest.mark.parametrize("bits", [8, 4])
def test_layernorm_reparameterization_keeps_outputs_and_integer_codes(bits):
    ln, lin = _ln_linear()
    x = torch.randn(300, 16, generator=_gen(9), dtype=torch.float64) * 2
    grid = Grid(bits, symmetric=False)
    h = ln(x)
    lo, hi = h.amin(0) * 0.9, h.amax(0) * 0.9  # some clipping, as the learned bounds do
    codes_before = _channel_codes(h, lo, hi, grid)
    y_before = lin(h)

    rp = reparam.from_channel_ranges(lo, hi, grid)
    assert float(rp.zero) == round(float(rp.zero))  # z~ rounded: the condition for identical codes
    r, delta = rp.r.double(), rp.delta.double()
    reparam.fold_into_norm(ln, r, delta)
    w, b = reparam.fold_into_consumer(lin.weight.double(), lin.bias.double(), r, delta)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    h2 = ln(x)
    assert torch.allclose(lin(h2), y_before, rtol=0, atol=REPARAM_FP_TOL)
    s, z = uniform.params_from_range(lo.double(), hi.double(), grid)
    codes_after = uniform.quantize(h2, s.mean(), torch.round(z.mean()), grid)
    assert torch.equal(codes_after, codes_before)


def test_explicit_affine_reparameterization_is_the_same_function():
    """Post-LN (BERT): the norm also feeds the residual, so x' = x / r - delta is a module."""
    _, lin = _ln_linear(seed=10)
    x = torch.randn(100, 16, generator=_gen(11), dtype=torch.float64)
    grid = Grid(8, symmetric=False)
    rp = reparam.from_channel_ranges(x.amin(0), x.amax(0), grid)
    affine = ChannelAffine(16, shift=True).double()
    with torch.no_grad():
        affine.scale.copy_(1 / rp.r.double())
        affine.shift.copy_(-rp.delta.double())
    w, b = reparam.fold_into_consumer(lin.weight.double(), lin.bias.double(), rp.r.double(), rp.delta.double())
    assert torch.allclose(affine(x) @ w.t() + b, lin(x), rtol=0, atol=REPARAM_FP_TOL)


def test_rmsnorm_accepts_only_a_scale_reparameterization():
    norm = nn.RMSNorm(8)
    with pytest.raises(ValueError, match="no bias"):
        reparam.fold_into_norm(norm, torch.ones(8), torch.ones(8))
    reparam.fold_into_norm(norm, torch.full((8,), 2.0), torch.zeros(8))
    assert torch.allclose(norm.weight, torch.full((8,), 0.5))


def test_smoothing_alpha_zero_is_the_identity_and_folds_exactly():
    ax, aw = torch.rand(16) * 10, torch.rand(16)
    assert torch.equal(reparam.smoothing(ax, aw, 0.0), torch.ones(16))
    r = reparam.smoothing(ax, aw, 0.7)
    assert math.isclose(float(r.log().mean()), 0.0, abs_tol=1e-5)
    _, lin = _ln_linear(seed=12)
    x = torch.randn(50, 16, generator=_gen(13), dtype=torch.float64)
    w, b = reparam.fold_into_consumer(lin.weight, lin.bias, r.double(), torch.zeros(16, dtype=torch.float64))
    assert torch.allclose((x / r.double()) @ w.t() + b, lin(x), atol=1e-9)


def test_symmetric_dual_clipping_ties_the_bounds():
    """RMSNorm inputs (no bias to absorb a shift): l_c = -u_c after learning. The strict gain of
    learned clipping is tested in test_algo_mutants.py (this file's former ``<=`` check could not
    fail: the optimizer keeps its start point when nothing improves)."""
    g = _gen(14)
    x = torch.randn(512, 24, generator=g)
    x[:, 3] = x[:, 3] * 20 + 5  # an outlier channel, off-centre
    w = torch.randn(16, 24, generator=g)
    lo0, hi0 = dual_clip.learn_bounds(x, [w], 4, steps=0, symmetric=True)
    lo_s, hi_s = dual_clip.learn_bounds(x, [w], 4, steps=20, symmetric=True)
    assert torch.allclose(lo_s, -hi_s) and torch.allclose(lo0, -hi0)
    assert not torch.equal(hi_s, hi0)  # learned, not the start point
