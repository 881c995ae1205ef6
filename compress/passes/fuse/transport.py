"""Optimal-transport plans between two models' neurons (Imfeld et al., ICLR 2024, after OTFusion).

A plan ``T`` (n0 x n1) couples the n0 neurons of the model being aligned with the n1 neurons of
the anchor. The ground cost is the Euclidean distance (not squared) between per-neuron feature
rows (standardised activations, or L2-normalised weight rows), divided by its maximum; the plan
comes from POT's exact solver (``ot.emd``, hard alignment) or entropic Sinkhorn (``ot.sinkhorn``,
soft alignment) under uniform marginals, and is scaled by n0 so that each row sums to 1.

Marginal correction for different widths (n0 != n1): the scaled plan's columns then sum to
n0 / n1, and the reference code's output-side product ``T^T W`` would *sum* n0/n1 neurons' weights
into each anchor neuron (a 256-wide MLP fused into a 128-wide anchor would double every
pre-activation). squeeze follows OTFusion's "proper marginals" instead: per-neuron parameters
(rows, biases, norms, embedding columns) are moved with the column-normalised plan
``T diag(1/colsum)``, so every anchor neuron receives a barycentre (weights sum to 1) of the
neurons mapped to it, while input columns are moved with the row-normalised ``T n0``, which
expresses each aligned neuron as a mixture of anchor neurons. For equal widths both coincide
with the paper's ``T n0``.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import ot
import torch

from squeeze.compress.errors import SqueezeError

Solver = Literal["sinkhorn", "emd", "none"]

#: per-neuron standardisation guard, as in the reference code: (a - mean) / (std + EPS)
STD_EPS = 1e-9
#: EMD iterations: the default 100k stops early on 3072-wide MLPs
EMD_ITERS = 1_000_000
#: Sinkhorn, as POT's defaults in the reference code (POT 0.8.2): at most 1000 iterations, stop at 1e-9
SINKHORN_ITERS = 1000
SINKHORN_STOP = 1e-9


def standardize(acts: torch.Tensor) -> torch.Tensor:
    """(n, samples) -> each neuron's row shifted to mean 0 and scaled to std 1."""
    mean = acts.mean(dim=1, keepdim=True)
    std = acts.std(dim=1, keepdim=True)
    return (acts - mean) / (std + STD_EPS)


def normalize_rows(w: torch.Tensor) -> torch.Tensor:
    """(n, features) -> each row L2-normalised (the weight-based cost's points)."""
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def ground_cost(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (not squared) between rows of x0 (n0, f) and x1 (n1, f), divided by
    the largest one (all zeros when every row is identical)."""
    m = torch.cdist(x0.double(), x1.double())
    top = m.max()
    return m / top if top > 0 else m


def solve(cost: torch.Tensor, solver: Solver, reg: float) -> torch.Tensor:
    """The plan (n0, n1) under uniform marginals, scaled by n0 so each row sums to 1.

    ``solver="none"`` is vanilla averaging: the identity (the two widths must agree).
    """
    n0, n1 = cost.shape
    if solver == "none":
        if n0 != n1:
            raise ValueError(f"vanilla averaging needs equal widths, got {n0} and {n1}")
        return torch.eye(n0, dtype=torch.float64)
    a, b = np.full(n0, 1.0 / n0), np.full(n1, 1.0 / n1)
    m = cost.double().numpy()
    if solver == "emd":
        plan = ot.emd(a, b, m, numItermax=EMD_ITERS)
    elif solver == "sinkhorn":
        with warnings.catch_warnings():  # POT warns when 1000 iterations do not reach 1e-9: so did the paper's runs
            warnings.simplefilter("ignore")
            plan = ot.sinkhorn(a, b, m, reg, method="sinkhorn", numItermax=SINKHORN_ITERS, stopThr=SINKHORN_STOP)
        if not np.isfinite(plan).all() or (plan.sum(axis=1) <= 0).any():
            raise SqueezeError(f"fuse: Sinkhorn underflowed at reg={reg}; use a larger --reg or --solver emd")
    else:
        raise ValueError(f"unknown solver {solver!r}")
    return torch.as_tensor(plan, dtype=torch.float64) * n0


def columns(plan: torch.Tensor) -> torch.Tensor:
    """The plan with each column normalised to sum 1 (empty columns stay zero): what moves a
    per-neuron parameter into the anchor's neurons as a barycentre."""
    s = plan.sum(dim=0, keepdim=True)
    return plan / torch.where(s > 0, s, torch.ones_like(s))


def transport(t: torch.Tensor, dim: int, plan: torch.Tensor) -> torch.Tensor:
    """Contract axis ``dim`` of ``t`` (n0 long) with ``plan`` (n0, n1): the axis becomes n1 long.

    For output rows this is ``plan^T @ W``, for input columns ``W @ plan``: the same contraction.
    """
    moved = torch.tensordot(t.double(), plan, dims=([dim], [0]))  # the new axis lands last
    return moved.movedim(-1, dim).to(t.dtype)


def kron_heads(head_plan: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A head-level plan (h0, h1) as a neuron-level plan over whole heads, dimensions kept."""
    return torch.kron(head_plan, torch.eye(head_dim, dtype=head_plan.dtype))


def head_plan(plan: torch.Tensor, heads0: int, heads1: int) -> torch.Tensor:
    """Mass a neuron-level plan moves between whole heads, scaled so each row sums to 1."""
    n0, n1 = plan.shape
    blocks = plan.reshape(heads0, n0 // heads0, heads1, n1 // heads1).sum(dim=(1, 3))
    return blocks / (n0 // heads0)


def expand_gqa(plan_v: torch.Tensor, heads_q: torch.Tensor, kv0: int, kv1: int) -> torch.Tensor:
    """W_O's input plan from the value plan and the query-head correspondence (GQA).

    W_O reads one block per *query* head h, holding the values of its key/value group g(h). The
    entry for (h, j) -> (h', j') is ``T_V[(g(h), j), (g(h'), j')] * W[h, h']`` with
    ``W[h, h'] = H_Q[h, h'] / sum_{h'' in g(h')} H_Q[h, h'']`` (uniform where that sum is 0): each
    row still sums to 1, and with one head per group (plain multi-head attention) ``W = 1`` and
    the plan is ``T_V`` itself.
    """
    h0, h1 = heads_q.shape
    r0, r1 = h0 // kv0, h1 // kv1
    dv0, dv1 = plan_v.shape[0] // kv0, plan_v.shape[1] // kv1
    grouped = heads_q.reshape(h0, kv1, r1)
    denom = grouped.sum(dim=2, keepdim=True)
    w = torch.where(denom > 0, grouped / torch.where(denom > 0, denom, torch.ones_like(denom)), 1.0 / r1)
    w = w.reshape(h0, h1)
    g0 = torch.arange(h0) // r0
    g1 = torch.arange(h1) // r1
    tv = plan_v.reshape(kv0, dv0, kv1, dv1)[g0][:, :, g1]  # (h0, dv0, h1, dv1)
    return (tv * w[:, None, :, None]).reshape(h0 * dv0, h1 * dv1)
