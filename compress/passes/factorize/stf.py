"""The Straight-Through Factorizer (STF): train the factorizations of every layer jointly.

Each factorized linear becomes an :class:`STFLinear` during training: it keeps a dense *latent*
weight W (initialised to the alternating-minimization factorization D S, so training starts
from the task-unaware initialization) and, in every forward pass, projects it onto the
dense-sparse set, ``W~ = P(W) = D S`` (warm-started alternating steps from the previous
projection, the support free to move), then computes with W~. The backward pass is straight
through: dL/dW := dL/dW~, so every coordinate of the latent, inside or outside the current
support of S, learns. After training, :meth:`STFLinear.to_dslinear` freezes the last
projection into a :class:`DSLinear`, whose D and S values get a short fine-tune of their own.

This is the most plausible reading of the abstract (ALGORITHMS.md section 3, unverified): the
paper's training details were not retrieved.
"""

from __future__ import annotations

import torch
from torch import nn

from squeeze.compress.passes.factorize.dslinear import DSLinear
from squeeze.compress.passes.factorize.solver import Factors, project


class STFLinear(nn.Module):
    """A linear whose forward uses the dense-sparse projection of its latent weight (STE).

    Args:
        f: the initial factorization (D, S); the latent starts at D S.
        bias: the original bias (trained as is).
        steps: alternating steps per projection.
    """

    def __init__(self, f: Factors, bias: torch.Tensor | None, steps: int = 1):
        super().__init__()
        self.f = Factors(f.dense.double(), f.values.double(), f.indices.long(), f.pattern, f.m)
        self.latent = nn.Parameter(self.f.weight().float())  # (out, in)
        self.bias = nn.Parameter(bias.detach().clone().float()) if bias is not None else None
        self.steps = steps
        self._key: tuple | None = None
        self._proj: torch.Tensor | None = None

    def projected(self) -> torch.Tensor:
        """W~ = P(W), recomputed when the latent changed (every training step)."""
        key = (self.latent._version, self.latent.data_ptr())
        if key != self._key:
            with torch.no_grad():
                self.f = project(self.latent, self.f, steps=self.steps)
                self._proj = self.f.weight().to(self.latent.dtype)
            self._key = key
        assert self._proj is not None
        return self._proj

    def ste_weight(self) -> torch.Tensor:
        """W~ in value, identity in gradient: W + (W~ - W).detach()."""
        return self.latent + (self.projected() - self.latent).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.ste_weight(), self.bias)

    def to_dslinear(self) -> DSLinear:
        """The current projection as a DSLinear (projected once more from the final latent)."""
        self.projected()
        return DSLinear.from_factors(
            self.f, self.bias.detach() if self.bias is not None else None, dtype=self.latent.dtype
        )
