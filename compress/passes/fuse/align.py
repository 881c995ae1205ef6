"""Align one model's weights to an anchor's neurons, space by space (Transformer Fusion with OT).

The walk follows the forward pass. The residual stream has one plan per *stage* (0: the
embeddings' output; 2i+1: after layer i's attention; 2i+2: after its MLP). In layer i:

* Q, K and V each take the stage-2i plan on their input columns and get their own plan from
  their own activations (``qk_fusion: separate``); alignment runs across heads over the full
  width, except under rotary positions, where a Q/K dimension may not leave its slot inside a
  head and the plans are solved between whole heads instead.
* W_O's input plan comes from the value plan (expanded per query head under GQA, see
  ``transport.expand_gqa``); its rows get the attention branch plan, and the stream plan after
  the attention is ``policy(stage 2i, branch)``; the MLP does the same with its hidden plan.
* Norms, biases and embedding columns are per-neuron parameters: they move with the plan of the
  space they sit in (columns normalised, see ``transport``). Readers of the final stream (head,
  pooler) only get their input aligned.

``cost="acts"`` compares standardised activations; ``cost="weights"`` compares the rows of the
input-aligned weights (L2-normalised). ``solver="none"`` makes every plan the identity: vanilla
averaging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from squeeze.compress.families import Axis, Space
from squeeze.compress.passes.fuse.transport import (
    Solver,
    columns,
    expand_gqa,
    ground_cost,
    head_plan,
    kron_heads,
    normalize_rows,
    solve,
    standardize,
    transport,
)

Cost = Literal["acts", "weights"]
Residual = Literal["mean", "weighted", "only_resid", "no_resid"]


@dataclass(frozen=True)
class AlignSettings:
    cost: Cost = "acts"
    solver: Solver = "sinkhorn"
    reg: float = 0.08
    residual: Residual = "mean"


class Aligner:
    """Plans from ``model`` (index 0 in the notation) to the anchor (index 1), then its state dict
    moved into the anchor's neurons.

    Args:
        spaces0, spaces1: ``families.weight_spaces`` of the two models (same order).
        state0, state1: their state dicts.
        acts0, acts1: ``acts.capture`` of both (needed for ``cost="acts"`` and ``residual="weighted"``).
    """

    def __init__(
        self, spaces0: list[Space], spaces1: list[Space], state0, state1, acts0, acts1, settings: AlignSettings
    ):
        self.s0 = {s.name: s for s in spaces0}
        self.s1 = {s.name: s for s in spaces1}
        self.state0, self.state1 = state0, state1
        self.acts0, self.acts1 = acts0, acts1
        self.cfg = settings
        self.plans: dict[tuple[str, str], torch.Tensor] = {}  # (space, part or stage) -> row-scaled plan
        self._by_param: dict[str, list[tuple[str, Axis]]] = {}  # model 0's tensor -> its (space, axis) pairs
        for name, s in self.s0.items():
            for ax in s.axes:
                self._by_param.setdefault(ax.param, []).append((name, ax))

    # ---------------- one plan ----------------

    def _solve(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return solve(ground_cost(x0, x1), self.cfg.solver, self.cfg.reg)

    def _act_plan(self, space: str, tap: str, heads: tuple[int, int] | None = None) -> torch.Tensor:
        x0 = standardize(self.acts0[f"{space}/{tap}"])
        x1 = standardize(self.acts1[f"{space}/{tap}"])
        return self._by_heads(x0, x1, heads)

    def _by_heads(self, x0: torch.Tensor, x1: torch.Tensor, heads: tuple[int, int] | None) -> torch.Tensor:
        if heads is None:
            return self._solve(x0, x1)
        h0, h1 = heads  # whole heads as points: (h, head_dim * features)
        plan = self._solve(x0.reshape(h0, -1), x1.reshape(h1, -1))
        return kron_heads(plan, x0.shape[0] // h0)

    def _rows(self, which: int, axes: list[Axis]) -> torch.Tensor:
        """The producers' rows of a space (axis moved first, flattened), model 0 input-aligned."""
        state = self.state0 if which == 0 else self.state1
        mats = []
        for ax in axes:
            t = self._narrow(state[ax.param], ax)
            if which == 0:
                t = self._align_other_axes(ax.param, t, skip=ax)
            mats.append(t.movedim(ax.dim, 0).reshape(t.shape[ax.dim], -1).double())
        return torch.cat(mats, dim=1)

    def _weight_plan(self, axes0: list[Axis], axes1: list[Axis], heads=None) -> torch.Tensor:
        return self._by_heads(normalize_rows(self._rows(0, axes0)), normalize_rows(self._rows(1, axes1)), heads)

    def _space_plan(self, name: str, part: str, tap: str, heads=None) -> torch.Tensor:
        if self.cfg.cost == "acts" or self.cfg.solver == "none":
            return self._act_plan(name, tap, heads) if self.cfg.solver != "none" else self._identity(name, part)
        return self._weight_plan(self._producers(0, name, part), self._producers(1, name, part), heads)

    def _producers(self, which: int, name: str, part: str, stage: int | None = None) -> list[Axis]:
        """The weight matrices whose rows are the space's neurons (biases and norms left out)."""
        space = (self.s0 if which == 0 else self.s1)[name]
        return [
            a for a in space.axes
            if a.part == part and a.io == "out" and a.param.endswith("weight") and (stage is None or a.stage == stage)
        ]  # fmt: skip

    def _identity(self, name: str, part: str) -> torch.Tensor:
        return solve(torch.zeros(self._size(0, name, part), self._size(1, name, part)), "none", 0.0)

    def _size(self, which: int, name: str, part: str) -> int:
        sizes = (self.s0 if which == 0 else self.s1)[name].sizes
        return sizes.get(part, sizes.get("all"))

    # ---------------- the residual policy ----------------

    def _combine(self, stage: int, branch: torch.Tensor, branch_tap: str) -> torch.Tensor:
        prev = self.plans[("residual", str(stage - 1))]
        policy = self.cfg.residual
        if policy == "only_resid":
            return prev
        if policy == "no_resid":
            return branch
        if policy == "weighted":  # weights proportional to the mean |activation| of stream and branch
            m = lambda tap: float(sum(a[f"residual/{tap}"].abs().mean() for a in (self.acts0, self.acts1)))  # noqa: E731
            w_prev, w_branch = m(f"stream.{stage - 1}"), m(branch_tap)
            return (w_prev * prev + w_branch * branch) / (w_prev + w_branch)
        return (prev + branch) / 2

    # ---------------- the walk ----------------

    def solve_all(self, n_layers: int) -> None:
        """Every plan, in forward order."""
        if self.cfg.cost == "weights" and self.cfg.solver != "none":
            emb0, emb1 = (self._producers(w, "residual", "embed", stage=0) for w in (0, 1))
            self.plans[("residual", "0")] = self._weight_plan(emb0, emb1)
        else:
            self.plans[("residual", "0")] = self._space_plan("residual", "all", "embed")
        for i in range(n_layers):
            qk, vo, mlp = (f"layers.{i}.{k}" for k in ("qk", "vo", "mlp"))
            q0, q1 = self.s0[qk], self.s1[qk]
            rope = q0.rope
            for part, h in (("q", (q0.heads, q1.heads)), ("k", (q0.kv_heads, q1.kv_heads))):
                self.plans[(qk, part)] = self._space_plan(qk, part, part, h if rope else None)
            self.plans[(vo, "v")] = self._space_plan(vo, "v", "v")
            heads_q = head_plan(self.plans[(qk, "q")], q0.heads, q1.heads)
            self.plans[(vo, "o")] = expand_gqa(self.plans[(vo, "v")], heads_q, q0.kv_heads, q1.kv_heads)
            for stage, branch_part, tap in ((2 * i + 1, "o", f"attn.{i}"), (2 * i + 2, "mlp_out", f"mlp.{i}")):
                if branch_part == "mlp_out":
                    self.plans[(mlp, "all")] = self._space_plan(mlp, "mlp_in", "hidden")
                branch = self._branch_plan(stage, branch_part, tap)
                self.plans[("residual", str(stage))] = self._combine(stage, branch, tap)

    def _branch_plan(self, stage: int, part: str, tap: str) -> torch.Tensor:
        if self.cfg.cost == "acts" or self.cfg.solver == "none":
            return self._space_plan("residual", "all", tap)
        return self._weight_plan(*(self._producers(w, "residual", part, stage=stage) for w in (0, 1)))

    # ---------------- moving tensors ----------------

    def plan_for(self, space: str, ax: Axis) -> torch.Tensor:
        plan: torch.Tensor | None
        if space == "residual":
            plan = self.plans[("residual", str(ax.stage))]
        else:
            plan = self.plans.get((space, ax.part), self.plans.get((space, "all")))
            assert plan is not None, f"no {space} plan for {ax.part}"
        return columns(plan) if ax.io == "out" else plan

    @staticmethod
    def _narrow(t: torch.Tensor, ax: Axis) -> torch.Tensor:
        stop = t.shape[ax.dim] if ax.stop is None else ax.stop
        return t.narrow(ax.dim, ax.start, stop - ax.start)

    def _align_other_axes(self, param: str, t: torch.Tensor, skip: Axis) -> torch.Tensor:
        """Input-align a producer's rows on its other whole-tensor axes whose plans exist already."""
        for name, ax in self._by_param.get(param, []):
            if ax.dim != skip.dim and ax.start == 0 and ax.stop is None and self._has_plan(name, ax):
                t = transport(t, ax.dim, self.plan_for(name, ax))
        return t

    def _has_plan(self, name: str, ax: Axis) -> bool:
        if name == "residual":
            return ("residual", str(ax.stage)) in self.plans
        return (name, ax.part) in self.plans or (name, "all") in self.plans

    def aligned_state(self) -> dict[str, torch.Tensor]:
        """Model 0's state dict moved into the anchor's neurons (the anchor's shapes)."""
        out = {}
        for key, t in self.state0.items():
            axes = self._by_param.get(key, [])
            if not axes or not t.is_floating_point():
                out[key] = t
                continue
            by_dim: dict[int, list[tuple[str, Axis]]] = {}
            for name, ax in axes:
                by_dim.setdefault(ax.dim, []).append((name, ax))
            for dim, group in by_dim.items():
                group.sort(key=lambda na: na[1].start)
                if len(group) == 1 and group[0][1].start == 0 and group[0][1].stop is None:
                    t = transport(t, dim, self.plan_for(*group[0]))
                else:  # a fused tensor: each slice has its own plan
                    t = torch.cat(
                        [transport(self._narrow(t, ax), dim, self.plan_for(name, ax)) for name, ax in group], dim=dim
                    )
            out[key] = t
        return out
