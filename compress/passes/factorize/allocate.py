"""Per-layer allocation of rank and non-zeros by measured reconstruction error (``allocation="error"``).

Uniform allocation gives every linear the same share ``ratio`` of its bytes. The error
allocation spends the same total, ``ratio * sum(bytes of the targeted linears)``, where it
lowers the error most:

1. Candidates: for each linear, the (k, s) that ``budget.choose`` picks at ``ratio * f`` for
   f in :data:`FRACTIONS` (capped below the dense layer's bytes); f = 1 is the uniform choice.
2. Measure: each candidate is factorized (``alloc_iters`` alternating steps) and its relative
   error e = ||W - D S|| / ||W|| recorded.
3. Greedy: start every linear at its smallest candidate, then repeatedly move the linear whose
   upgrade (to any larger candidate that still fits the total) removes the most cost per added
   byte, until nothing fits. If uniform allocation costs less, it is kept.

The cost of a linear is ``e**2 * numel(W)``: its squared error in units of its own mean squared
weight, summed over its weights (so a 4x larger layer weighs 4x). Measured on all-MiniLM-L6-v2 at
50% (2-step factorizations, ``benchmarks/results/factorize_stack.md``), embedding cosine against
uniform's 0.382: this cost 0.463, ``e * numel`` 0.448, ``||W - D S||**2`` 0.433, and the plain sum
of relative errors 0.321 (it lowers the mean relative error most, 0.338 vs 0.454, by starving the
MLP input linears, and the output suffers): the objective was picked on that measurement.

Cost: ``len(FRACTIONS)`` factorizations per linear at ``alloc_iters`` steps, on top of the final one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from squeeze.compress.errors import SqueezeError
from squeeze.compress.passes.factorize.budget import choose, factor_bytes
from squeeze.compress.passes.factorize.solver import Factors, factorize

#: multiples of the uniform ratio tried per linear (1.0 is the uniform choice)
FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
MAX_SHARE = 0.99  # a factorized layer may not store as much as the dense one


@dataclass
class Candidate:
    k: int
    s: int
    bytes: int
    error: float  # relative error ||W - D S|| / ||W||
    factors: Factors
    cost: float = 0.0  # what the greedy minimizes: error**2 * numel(W)


def candidates(
    w: torch.Tensor, ratio: float, density: float, *, pattern: str, m: int, iters: int, coder: str
) -> list[Candidate]:
    """The measured (k, s) options of one linear, by increasing bytes (uniform's included)."""
    out_f, in_f = w.shape
    elem = w.element_size()
    seen: dict[tuple[int, int], Candidate] = {}
    for f in FRACTIONS:
        share = min(ratio * f, MAX_SHARE) if f != 1.0 else ratio
        try:
            k, s = choose(out_f, in_f, share, density, pattern=pattern, m=m, elem=elem)
        except SqueezeError:
            continue  # below the smallest factorization of this shape
        if (k, s) in seen:
            continue
        fac, errs = factorize(w, k, s, iters=iters, coder=coder, pattern=pattern, m=m)
        err = min(errs)
        seen[(k, s)] = Candidate(k, s, factor_bytes(out_f, in_f, k, s, elem), err, fac, err**2 * w.numel())
    return sorted(seen.values(), key=lambda c: c.bytes)


def greedy(options: list[list[Candidate]], budget: float) -> list[int]:
    """Index of the chosen candidate per linear: most error removed per byte, within ``budget``."""
    pick = [0] * len(options)
    spent = sum(o[0].bytes for o in options)
    while True:
        best: tuple[float, int, int] | None = None
        for i, opts in enumerate(options):
            cur = opts[pick[i]]
            for j in range(pick[i] + 1, len(opts)):
                extra = opts[j].bytes - cur.bytes
                gain = (cur.cost - opts[j].cost) / max(extra, 1)
                if spent + extra <= budget and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, i, j)
        if best is None:
            return pick
        _, i, j = best
        spent += options[i][j].bytes - options[i][pick[i]].bytes
        pick[i] = j


def allocate(
    weights: list[torch.Tensor],
    ratio: float,
    density: float,
    *,
    pattern: str = "column",
    m: int = 4,
    iters: int = 2,
    coder: str = "topk",
    step: Callable[[int, int], None] = lambda i, n: None,
) -> tuple[list[Candidate], dict[str, float]]:
    """The chosen candidate of every linear (same order as ``weights``) and a summary."""
    if ratio >= 1.0:
        raise SqueezeError("--allocation error needs --ratio below 1 (ratio 1 is the exact full factorization)")
    options = []
    for n, w in enumerate(weights):
        options.append(candidates(w, ratio, density, pattern=pattern, m=m, iters=iters, coder=coder))
        step(n + 1, len(weights))
    if any(not o for o in options):
        raise SqueezeError(f"--ratio {ratio:g} is too small for error allocation: a linear has no factorization")
    budget = ratio * sum(w.shape[0] * w.shape[1] * w.element_size() for w in weights)
    pick = greedy(options, budget)
    uniform = []
    for w, opts in zip(weights, options, strict=True):
        k, s = choose(*w.shape, ratio, density, pattern=pattern, m=m, elem=w.element_size())
        uniform.append(next(j for j, c in enumerate(opts) if (c.k, c.s) == (k, s)))
    cost = sum(o[j].cost for o, j in zip(options, pick, strict=True))
    cost_uniform = sum(o[j].cost for o, j in zip(options, uniform, strict=True))
    if cost_uniform < cost:
        pick, cost = uniform, cost_uniform
    chosen = [o[j] for o, j in zip(options, pick, strict=True)]
    n = len(chosen)
    return chosen, {
        "budget_bytes": int(budget),
        "bytes": sum(c.bytes for c in chosen),
        "cost": round(cost, 4),
        "uniform_cost": round(cost_uniform, 4),
        "error_mean": round(sum(c.error for c in chosen) / n, 6),
        "uniform_error_mean": round(sum(o[j].error for o, j in zip(options, uniform, strict=True)) / n, 6),
        "measure_iters": iters,
    }
