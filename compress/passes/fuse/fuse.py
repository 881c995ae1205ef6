"""``fuse``: optimal-transport fusion of several transformers into one (Imfeld, Graldi, Giordano,
Hofmann, Anagnostidis, Singh; ICLR 2024).

Each model is aligned to the anchor (the last model unless ``anchor`` says otherwise): the plans
of ``align.Aligner`` move its neurons into the anchor's, space by space as
``families.weight_spaces`` lists them, and the aligned models are averaged with weight 1/N each
(or the given weights). The result has the anchor's architecture; with different widths the
plans are rectangular (see ``transport`` for the marginal correction). ``solver="none"`` is
vanilla weight averaging, the baseline the paper beats. With ``finetune_steps > 0`` the fused
model is then distilled (``compress.distill``) from the ensemble of its parents (the weighted
mean of their logits) on the calibration data.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal, cast

import torch
from pydantic import ConfigDict, Field, field_validator
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family, build_from_config, weight_spaces
from squeeze.compress.passes.base import Edit, MultiModelConfig, Pass, PassConfig, PassContext, PassResult
from squeeze.compress.passes.fuse.acts import capture
from squeeze.compress.passes.fuse.align import Aligner, AlignSettings
from squeeze.compress.passes.fuse.compat import check_compatible


class FuseConfig(MultiModelConfig):
    """How to fuse. ``others`` (from the base) are the other models of a recipe step, after its input."""

    anchor: int = Field(-1, description="index of the anchor among the models (-1: the last)")
    cost: Literal["acts", "weights"] = "acts"
    solver: Literal["sinkhorn", "emd", "none"] = "sinkhorn"
    reg: float = Field(0.08, gt=0, le=100, description="Sinkhorn regularisation (of the max-normalised cost)")
    residual: Literal["mean", "weighted", "only_resid", "no_resid"] = "mean"
    weights: list[float] | None = Field(None, description="one weight per model (normalised); default 1/N")
    max_tokens: int = Field(4096, ge=8, le=1_000_000, description="activation samples (tokens) per neuron")
    finetune_steps: int = Field(0, ge=0, le=1_000_000)
    finetune_lr: float = Field(1e-4, gt=0, le=1)

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (any(not (w >= 0 and w < float("inf")) for w in v) or sum(v) <= 0):
            raise ValueError("weights must be finite, non-negative and not all zero")
        return v


class FuseResult(PassResult):
    """What the manifest records about a fusion."""

    model_config = ConfigDict(extra="forbid")

    models: int
    anchor: int
    weights: list[float]
    solver: str
    cost: str
    #: the anchor's config and architecture when the result's shape is not the first model's
    config: dict[str, Any] | None = None
    architecture: str | None = None
    #: mean over all plans of the mass on each row's largest entry (1.0: every plan is a permutation)
    plan_sharpness: float
    finetune: dict[str, Any] | None = None

    def summary(self) -> list[str]:
        w = ", ".join(f"{x:.3g}" for x in self.weights)
        lines = [f"fused {self.models} models into model {self.anchor + 1}'s shape ({self.solver}, {self.cost} cost), "
                 f"weights {w}, plan sharpness {self.plan_sharpness:.3f}"]  # fmt: skip
        if self.finetune:
            f = self.finetune
            lines.append(
                f"fine-tuned {f['steps']} steps on the parents' ensemble: loss {f['loss_first']:.4g} -> {f['loss_last']:.4g}"
            )
        return lines


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _tied(state: dict[str, torch.Tensor], covered: set[str]) -> dict[str, str]:
    """Keys no space lists that share storage with one it does (GPT-2's lm_head is wte): key -> that key."""
    ptr = {(state[k].data_ptr(), state[k].shape): k for k in covered if k in state}
    return {
        k: ptr[(v.data_ptr(), v.shape)] for k, v in state.items() if k not in covered and (v.data_ptr(), v.shape) in ptr
    }


class FusePass(Pass):
    name: ClassVar[str] = "fuse"
    Config: ClassVar[type[PassConfig]] = FuseConfig
    Result: ClassVar[type[PassResult]] = FuseResult
    multi_model: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True

    def _anchor(self, n: int) -> int:
        a = cast(FuseConfig, self.config).anchor
        if not -n <= a < n:
            raise SqueezeError(f"fuse: anchor {a} is not one of the {n} models")
        return a % n

    def _weights(self, n: int) -> list[float]:
        w = cast(FuseConfig, self.config).weights
        if w is None:
            return [1.0 / n] * n
        if len(w) != n:
            raise SqueezeError(f"fuse: {len(w)} weights for {n} models (give one weight per model)")
        return [x / sum(w) for x in w]

    def check(self, family: Family, models: list[nn.Module] | None = None) -> None:
        models = models or []
        cfg = cast(FuseConfig, self.config)
        if cfg.others and len(cfg.others) + 1 != len(models):
            raise SqueezeError(f"fuse: {len(cfg.others)} other models configured but {len(models) - 1} given")
        check_compatible(models)
        anchor = self._anchor(len(models))
        self._weights(len(models))
        ref = models[anchor]
        same_shape = all(_shapes(m) == _shapes(ref) for m in models)
        if cfg.solver == "none" and not same_shape:
            raise SqueezeError(
                "fuse: vanilla averaging (--solver none) needs models of one shape; these differ in width"
            )
        if cfg.finetune_steps and family.head_module(ref) is None:
            raise SqueezeError("fuse: --finetune-steps needs models with a head (the teacher averages their logits)")
        # every tensor no weight space covers must already have the anchor's shape
        ref_shapes = _shapes(ref)
        ref_qk = next(s for s in weight_spaces(family, ref) if s.kind == "qk")
        for i, m in enumerate(models):
            spaces = weight_spaces(family, m)
            qk = next(s for s in spaces if s.kind == "qk")
            if qk.rope and qk.head_dim != ref_qk.head_dim:
                raise SqueezeError(
                    f"fuse: head size differs: model {i + 1} has {qk.head_dim}, the anchor "
                    f"{ref_qk.head_dim}; under rotary positions each dimension turns at its own frequency"
                )
            covered = {ax.param for s in spaces for ax in s.axes}
            covered |= set(_tied(m.state_dict(), covered))
            for key, shape in _shapes(m).items():
                if key not in covered and shape != ref_shapes.get(key):
                    raise SqueezeError(
                        f"fuse: {key} has shape {shape} in model {i + 1} but {ref_shapes.get(key)} "
                        "in the anchor, and no weight space aligns it"
                    )

    def apply(self, models: list[nn.Module], ctx: PassContext) -> nn.Module:
        cfg = cast(FuseConfig, self.config)
        family = ctx.family
        n = len(models)
        anchor_i = self._anchor(n)
        weights = self._weights(n)
        anchor = models[anchor_i]
        settings = AlignSettings(cost=cfg.cost, solver=cfg.solver, reg=cfg.reg, residual=cfg.residual)
        spaces = [weight_spaces(family, m) for m in models]
        need_acts = (cfg.cost == "acts" or cfg.residual == "weighted") and cfg.solver != "none"
        acts: list[dict[str, torch.Tensor]] = [{} for _ in models]
        if need_acts:
            batches = ctx.calib_batches()
            for i, m in enumerate(models):
                ctx.step("fuse: activations", i, n)
                acts[i] = capture(m, family, spaces[i], batches, cfg.max_tokens)
        anchor_state = anchor.state_dict()
        fused = {k: (v.double() * weights[anchor_i] if v.is_floating_point() else v) for k, v in anchor_state.items()}
        sharp: list[float] = []
        for i, m in enumerate(models):
            if i == anchor_i:
                continue
            ctx.step("fuse: aligning", i, n)
            al = Aligner(spaces[i], spaces[anchor_i], m.state_dict(), anchor_state, acts[i], acts[anchor_i], settings)
            al.solve_all(family.num_layers(m))
            sharp += [float(p.max(dim=1).values.mean()) for p in al.plans.values()]
            tied = _tied(m.state_dict(), {ax.param for s in spaces[i] for ax in s.axes})
            for k, v in al.aligned_state().items():
                if v.is_floating_point() and k not in tied:
                    fused[k] = fused[k] + weights[i] * v.double()
        out = copy.deepcopy(anchor)
        state = {k: v.to(anchor_state[k].dtype) for k, v in fused.items()}
        covered = {ax.param for s in spaces[anchor_i] for ax in s.axes}
        for k, j in _tied(anchor_state, covered).items():  # a tied head takes its embedding's fused value
            state[k] = state[j]
        out.load_state_dict(state)
        finetune = self._finetune(out, models, weights, ctx) if cfg.finetune_steps else None
        first = models[0]
        differs = _shapes(anchor) != _shapes(first) or type(anchor) is not type(first)
        result = FuseResult(
            models=n, anchor=anchor_i, weights=weights, solver=cfg.solver, cost=cfg.cost,
            config=cast(Any, anchor.config).to_dict() if differs else None,
            architecture=type(anchor).__name__ if differs else None,
            plan_sharpness=round(sum(sharp) / max(len(sharp), 1), 4) if sharp else 1.0,
            finetune=finetune,
        )  # fmt: skip
        ctx.result = result
        metrics: dict[str, Any] = {"models": n, "anchor": anchor_i, "solver": cfg.solver, "cost": cfg.cost,
                                   "plan_sharpness": result.plan_sharpness}  # fmt: skip
        if cfg.solver != "none" and ctx.checkpoint is not None and all(_shapes(m) == _shapes(anchor) for m in models):
            metrics["vanilla_fidelity"] = self._vanilla_fidelity(models, weights, anchor, ctx)
        ctx.metrics.update(fuse=metrics)
        return out.eval()

    @staticmethod
    def _vanilla_fidelity(models: list[nn.Module], weights: list[float], anchor: nn.Module, ctx: PassContext):
        """The ledger's baseline: plain weight averaging's fidelity against the first model (as the row's own)."""
        from squeeze.compress.evaluate import compare_outputs, reference_outputs

        states = [m.state_dict() for m in models]
        mean = {k: sum(w * s[k].double() for w, s in zip(weights, states, strict=True)).to(v.dtype)
                if v.is_floating_point() else v for k, v in states[0].items()}  # fmt: skip
        vanilla = copy.deepcopy(anchor)
        vanilla.load_state_dict(mean)
        batches = ctx.eval_batches()
        ref = reference_outputs(models[0], ctx.family, batches)
        return compare_outputs(ref, reference_outputs(vanilla, ctx.family, batches))

    def _finetune(self, model: nn.Module, parents: list[nn.Module], weights: list[float], ctx: PassContext):
        from squeeze.compress.distill import DistillConfig, distill
        from squeeze.compress.distill_losses import model_targets

        cfg = cast(FuseConfig, self.config)
        family = ctx.family

        def teacher(batch, need_hidden: bool, need_layers: bool):
            with torch.no_grad():
                outs = [model_targets(p.eval(), family, batch) for p in parents]
            t = outs[0]
            t.output = sum(w * o.output for w, o in zip(weights, outs, strict=True))
            return t

        res = distill(
            model,
            teacher,
            ctx.calib_batches(),
            DistillConfig(steps=cfg.finetune_steps, lr=cfg.finetune_lr),
            ctx,
        )
        model.eval()
        return {"steps": res.steps, "loss_first": res.loss_first, "loss_last": res.loss_last}

    def restructure(self, model: nn.Module, edit: Edit, family: Family) -> nn.Module:
        res = FuseResult.model_validate(edit.result)
        if res.config is None:
            return model
        from transformers import AutoConfig

        cfg = dict(res.config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        config.architectures = [res.architecture] if res.architecture else config.architectures
        return build_from_config(family, config)
