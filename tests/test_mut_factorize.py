"""Behaviour tests for factorize written against its mutation-testing survivors (issue 17).

Each test names the one-line bug it catches: the solver's exact-refit schedule and best-iterate
tracking, the int8 layer's scale dtype, the error allocation's summary, and the label of the
training data the STF / fine-tune used.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import squeeze.compress.train_data as train_data
from squeeze.compress.errors import SqueezeError
from squeeze.compress.passes.factorize import DSLinear
from squeeze.compress.passes.factorize.allocate import Candidate, allocate, greedy
from squeeze.compress.passes.factorize.budget import choose, nnz_for
from squeeze.compress.passes.factorize.int8 import DSLinearInt8
from squeeze.compress.passes.factorize.solver import factorize, project, refit, to_dense
from squeeze.compress.passes.factorize.stf import STFLinear
from squeeze.compress.passes.factorize.train import training_data

EXACT_ATOL = 1e-9  # exact least-squares values vs a fresh refit on the same support; measured ~1e-15
STF_ATOL = 1e-5  # the STF's float32 projection vs the same projection in float64; measured ~1e-7
FWD_ATOL = 1e-12  # float64 int8 layer vs its own dequantized weight; measured ~1e-16


def _weight(seed: int, out_f: int = 12, in_f: int = 16) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_exact_refit_schedule():
    """refit_every=1 fits exactly on every iterate, refit_every=0 only on the last one
    (bugs: the exact flag never / always set, or set on every iterate but the last)."""
    w = _weight(0)
    polished, errs0 = factorize(w, 8, 2, iters=3, refit_every=0)
    _, errs1 = factorize(w, 8, 2, iters=3, refit_every=1)
    # the warm start's D has orthogonal columns (both fits agree there), so both runs reach the
    # same D after one step; there the exact fit is strictly better than the polish steps
    assert errs1[0] == pytest.approx(errs0[0], abs=1e-12)
    assert errs1[1] < errs0[1] - 1e-6
    # with refit_every=0 the last iterate is fitted exactly: the best factors are a least-squares fit
    assert errs0.index(min(errs0)) == len(errs0) - 1
    d = polished.dense
    exact = refit(d.t() @ d, d.t() @ w, polished.indices)
    torch.testing.assert_close(polished.values, exact, atol=EXACT_ATOL, rtol=0)


def test_best_iterate_is_returned_when_a_later_one_is_worse():
    """The returned factors are the lowest-error iterate, not the last one that beats the warm
    start (bug: comparing each error with the first one only)."""
    w = _weight(4)
    best, errs = factorize(w, 8, 2, iters=6, coder="omp")
    low = min(errs)
    assert errs[-1] > low + 1e-4 and errs[-2] > low + 1e-4  # the setting: the error went up again
    got = float((w - best.weight()).norm() / w.norm())
    assert got == pytest.approx(low, abs=1e-12)


def test_int8_layer_keeps_the_float64_dtype():
    """A float64 DSLinear quantizes to an int8 layer whose scales, dequantized factors and
    forward stay float64 (bug: a scale buffer created in the default float32)."""
    w = _weight(1, 10, 14)
    f, _ = factorize(w, 6, 3, iters=2)
    ds = DSLinear.from_factors(f, torch.randn(10, dtype=torch.float64), dtype=torch.float64)
    q = DSLinearInt8.from_dslinear(ds, 8)
    assert q.values.dtype == q.dense.dtype == torch.float64
    x = torch.randn(5, 14, dtype=torch.float64)
    y = q(x)
    assert y.dtype == torch.float64
    ref = x @ (q.dense @ to_dense(q.values, q.indices.long(), q.rank)).t() + ds.bias.detach()
    torch.testing.assert_close(y, ref, atol=FWD_ATOL, rtol=0)


def test_allocation_summary_reports_its_measure_steps():
    """The allocation summary records how many alternating steps measured each candidate
    (bug: the summary key misspelt, so the report drops it)."""
    ws = [_weight(2, 16, 16).float(), _weight(3, 16, 24).float()]
    chosen, summary = allocate(ws, 0.5, 0.25, iters=1)
    assert summary["measure_iters"] == 1
    assert len(chosen) == 2 and summary["bytes"] <= summary["budget_bytes"]


@pytest.mark.parametrize("wiki", [True, False])
def test_auto_training_data_label(monkeypatch, wiki):
    """data=auto on a text model trains on the wiki text when installed, else on the built-in
    lines, and labels the run with the source it used (bug: a wrong label for the fallback)."""
    seen = {}

    def fake_batches(ckpt, spec, *, teacher=None, warn=None):
        seen["source"] = spec.source
        return ["batch"]

    monkeypatch.setattr(train_data, "wiki_available", lambda: wiki)
    monkeypatch.setattr(train_data, "training_batches", fake_batches)
    ctx = SimpleNamespace(family=SimpleNamespace(modality="text"), calibration=None, checkpoint=None, seed=0)
    ctx.warn = lambda m: None
    cfg = SimpleNamespace(data="auto", samples=8, seq_len=16, batch_size=4)
    source, data = training_data(ctx, cfg)  # type: ignore[arg-type]
    want = "wiki" if wiki else "builtin"
    assert source == seen["source"] == want and data == ["batch"]


def test_greedy_spends_bytes_where_the_most_cost_is_removed_per_byte():
    """Room for one upgrade: it goes to the linear whose cost drops most per added byte
    (bug: adding the costs instead of taking their difference)."""

    def opts(cost_small: float, cost_big: float) -> list[Candidate]:
        return [Candidate(4, 2, 10, 0.0, None, cost_small), Candidate(8, 4, 20, 0.0, None, cost_big)]  # type: ignore[arg-type]

    assert greedy([opts(10.0, 2.0), opts(10.0, 9.0)], budget=30) == [1, 0]
    assert greedy([opts(10.0, 9.0), opts(10.0, 2.0)], budget=30) == [0, 1]
    assert greedy([opts(10.0, 2.0), opts(10.0, 9.0)], budget=40) == [1, 1]


def test_nm_nonzeros_are_n_of_every_m_rows():
    """N:M keeps round(density * m) (at least 1) of every m rows (bug: the N:M branch broken)."""
    assert nnz_for(8, 0.5, "nm", 4) == 4
    assert nnz_for(16, 0.25, "nm", 4) == 4
    assert nnz_for(8, 0.01, "nm", 4) == 2  # one per group of 4, never none
    assert nnz_for(8, 0.5, "column") == 4


def test_too_small_ratio_names_the_smallest_ratio_that_fits():
    """The refusal states the smallest workable ratio, a fraction below 1 (bug: scaled by 1e6)."""
    with pytest.raises(SqueezeError, match=r"needs 0\.\d+$"):
        choose(64, 64, 0.001, 0.25)


def test_stf_projects_onto_the_layers_own_nm_pattern():
    """The STF projects its latent onto the layer's N:M pattern with the layer's m (bug: m
    dropped, so a 4:8 layer is projected onto the stricter 2:4 set)."""
    w = _weight(5, 16, 24)
    f, _ = factorize(w, 16, 8, iters=2, pattern="nm", m=8)
    stf = STFLinear(f, None)
    with torch.no_grad():
        stf.latent.add_(0.3 * torch.randn(stf.latent.shape, generator=torch.Generator().manual_seed(6)))
    want = project(stf.latent, f, steps=1).weight()
    assert not torch.allclose(project(stf.latent, replace(f, m=4), steps=1).weight(), want, atol=1e-3)
    torch.testing.assert_close(stf.projected().double(), want, atol=STF_ATOL, rtol=0)
