"""``reparam``: SLAB's progressive LayerNorm -> RepBN, the exact fold, and simplified linear attention.

    squeeze reparam CKPT -o OUT [--norms all|attn|mlp|final] [--steps 600] [--warmup 0] [--decay T]
                     [--attention keep|sla] [--no-fold] [--data FILE]

1. Every selected norm becomes a :class:`ProgressiveNorm` (the original norm blended into a
   :class:`RepBN` whose BN affine starts from the norm's own affine); with ``--attention sla``
   every attention sublayer of a ViT becomes :class:`SimplifiedLinearAttention` around its own
   projections.
2. The model is distilled toward the original (the LayerNorm teacher) with the project's engine
   (``compress/distill.py``: output + per-layer losses). The schedule (gamma 1 during ``warmup``,
   then linearly to 0 over ``decay`` optimizer steps, RepBN alone after) advances once per
   optimizer step, whatever the gradient accumulation.
3. Each ProgressiveNorm becomes its RepBN (what eval computed all along), and with ``fold`` (the
   default) every RepBN is folded into its neighbours as ``placement.py`` describes: no norm op
   is left where a norm was.
"""

from __future__ import annotations

import copy
import logging
from typing import ClassVar, Literal, cast

import torch
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family
from squeeze.compress.passes.base import Edit, Pass, PassConfig, PassContext, PassResult
from squeeze.compress.passes.reparam.init import fit_sites
from squeeze.compress.passes.reparam.norms import (
    ChannelAffine,
    ProgressiveNorm,
    RepBN,
    advance_schedule,
    install_token_mask_hook,
)
from squeeze.compress.passes.reparam.placement import fold_norms, get_site, rebuild, set_site, sites
from squeeze.compress.passes.reparam.sla import SimplifiedLinearAttention, count_tokens, swap_attention, token_grid

log = logging.getLogger(__name__)

SUPPORTED = ("bert", "vit", "llama", "gpt2")


class ReparamConfig(PassConfig):
    """Settings of the reparam pass (steps are optimizer steps)."""

    norms: Literal["all", "attn", "mlp", "final"] = "all"
    steps: int = Field(600, ge=1, le=1_000_000)
    warmup: int = Field(0, ge=0)
    decay: int | None = Field(None, ge=0, description="T: steps of the 1 -> 0 decay (default: half of steps - warmup)")
    attention: Literal["keep", "sla"] = "keep"
    fold: bool = True
    lr: float = Field(1e-4, gt=0, le=1.0)
    accumulate: int = Field(1, ge=1, le=1024)
    eta: float = 0.0  # initial eta (SLAB's vision code starts at 1, its LLaMA code at 0)
    init: Literal["fit", "copy"] = "fit"  # fit: least-squares RepBN per site (init.py); copy: the norm's affine
    fit_batches: int = Field(16, ge=1, le=10_000)
    data: str = Field(
        "auto", description="training data: auto (wiki text; images: the calibration source), or as for distill"
    )
    samples: int = Field(4096, ge=1, le=1_000_000)
    seq_len: int = Field(128, ge=4, le=32_768)
    batch_size: int = Field(16, ge=1, le=4096)

    @model_validator(mode="after")
    def _schedule_fits(self) -> ReparamConfig:
        if self.warmup >= self.steps:
            raise ValueError(f"warmup ({self.warmup}) must be shorter than steps ({self.steps})")
        if self.warmup + self.schedule_steps > self.steps:
            raise ValueError(
                f"warmup + decay ({self.warmup} + {self.decay}) must fit in steps ({self.steps}): "
                "the model must end on RepBN alone"
            )
        return self

    @property
    def schedule_steps(self) -> int:
        return self.decay if self.decay is not None else (self.steps - self.warmup) // 2


class ReparamResult(PassResult):
    """What a reload needs: what stands at each norm site, which linears gained a bias, SLA."""

    model_config = ConfigDict(extra="forbid")

    norms: dict[str, Literal["identity", "affine", "repbn"]]
    biased: list[str] = Field(default_factory=list)
    sla_layers: list[int] = Field(default_factory=list)
    sla_tokens: int | None = None
    sla_grid: int | None = None

    def summary(self) -> list[str]:
        kinds = list(self.norms.values())
        lines = [
            f"{kinds.count('identity')} norms folded away, {kinds.count('affine')} left as a per-channel affine, "
            f"{kinds.count('repbn')} RepBN (unfolded)"
        ]
        if self.biased:
            lines.append(f"{len(self.biased)} linears gained a bias")
        if self.sla_layers:
            lines.append(
                f"simplified linear attention in layers {self.sla_layers} ({self.sla_grid}x{self.sla_grid} grid)"
            )
        return lines


def _repbn_like(norm: nn.Module, dim: int, eta: float) -> RepBN:
    rep = RepBN(dim, eta=eta)
    w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
    with torch.no_grad():
        if isinstance(w, torch.Tensor):
            rep.weight.copy_(w)
        if isinstance(b, torch.Tensor):
            rep.bias.copy_(b)
    return rep.to(w.dtype) if isinstance(w, torch.Tensor) else rep


def _train_norms(step: int, model: nn.Module) -> None:
    """distill keeps the student in eval mode (no dropout); the norms need their training path."""
    for m in model.modules():
        if isinstance(m, (ProgressiveNorm, RepBN)):
            m.train()


def _advance(step: int, model: nn.Module) -> None:
    advance_schedule(model)


class ReparamPass(Pass):
    name: ClassVar[str] = "reparam"
    Config: ClassVar[type[PassConfig]] = ReparamConfig
    needs_calibration: ClassVar[bool] = True
    Result: ClassVar[type[PassResult]] = ReparamResult

    def check(self, family: Family, models: list[nn.Module] | None = None) -> None:
        cfg = cast(ReparamConfig, self.config)
        if family.name not in SUPPORTED:
            raise SqueezeError(f"reparam supports the {', '.join(SUPPORTED)} families, not {family.name!r}")
        if cfg.attention == "sla" and family.modality != "vision":
            raise SqueezeError(f"--attention sla needs a patch grid (ViT); {family.name} is a text family")
        if cfg.norms == "final" and family.final_norm is None:
            raise SqueezeError(f"{family.name} has no final norm: choose --norms all, attn or mlp")
        if family.norm_placement == "post" and cfg.fold and cfg.norms != "all":
            raise SqueezeError(
                f"{family.name} is post-LN: its norms sit on the residual stream, so folding needs "
                "every one of them (--norms all, or --no-fold)"
            )
        for model in models or []:
            if any(
                isinstance(m, (RepBN, ProgressiveNorm, ChannelAffine, SimplifiedLinearAttention))
                for m in model.modules()
            ):
                raise SqueezeError("this checkpoint is already reparameterized")
            for i, layer in enumerate(family.layers(model)):
                if family.norm_placement == "post" and any(family.is_skipped(layer, s) for s in ("attn", "mlp")):
                    raise SqueezeError(
                        f"{family.name} layer {i} has a dropped sublayer: the post-LN fold needs every "
                        "norm of the residual stream; reparameterize before pruning"
                    )
                for key, lin in family.linears(layer).items():
                    if not family.is_linear(lin):
                        raise SqueezeError(
                            f"layer {i} {key} is {type(lin).__name__}, not a float linear: "
                            "reparameterize before quantizing"
                        )
            for site in sites(family, model, cfg.norms):
                if isinstance(get_site(family, model, site), nn.Identity):
                    raise SqueezeError(f"the norm at {site} is already folded away")

    def data_source(self, ctx: PassContext) -> str:
        """The training source: ``auto`` is the wiki text for text models (the 300 built-in lines
        when it is not installed) and the calibration images for ViT."""
        from squeeze.compress.train_data import wiki_available

        src = cast(ReparamConfig, self.config).data
        if src != "auto":
            return src
        calib = ctx.calibration.source if ctx.calibration is not None else "builtin"
        if ctx.family.modality == "vision":
            if calib in ("builtin", "synthetic"):
                ctx.warn("reparam: no image data given, training on synthetic images (pass --data an .npz or folder)")
                return "synthetic"
            return calib
        if calib not in ("builtin", "synthetic"):
            return calib
        if wiki_available():
            return "wiki"
        ctx.warn("reparam: the wiki training text is not installed; training on the 300 built-in calibration lines")
        return "builtin"

    def apply(self, models: list[nn.Module], ctx: PassContext) -> nn.Module:
        from squeeze.compress.distill import DistillConfig, distill
        from squeeze.compress.train_data import TrainSpec, training_batches

        cfg = cast(ReparamConfig, self.config)
        fam = ctx.family
        self.check(fam, models)
        model = models[0]
        teacher = copy.deepcopy(model).eval()
        spec = TrainSpec(
            source=self.data_source(ctx),
            samples=cfg.samples,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            seed=ctx.seed,
        )
        batches = training_batches(ctx.checkpoint, spec, warn=ctx.warn)
        if not batches:
            raise SqueezeError("reparam: no training batches (the data source is empty)")
        result = ReparamResult(norms={})
        if cfg.attention == "sla":
            tokens = count_tokens(fam, model, batches[0])
            grid = token_grid(tokens)
            result.sla_layers = swap_attention(fam, model, tokens, grid)
            result.sla_tokens, result.sla_grid = tokens, grid
        chosen = sites(fam, model, cfg.norms)
        dim = fam.hidden_size(model.config)
        for site in chosen:
            norm = get_site(fam, model, site)
            set_site(
                fam, model, site, ProgressiveNorm(norm, _repbn_like(norm, dim, cfg.eta), cfg.schedule_steps, cfg.warmup)
            )
        install_token_mask_hook(fam.base(model))
        if cfg.init == "fit":
            pns = [get_site(fam, model, s) for s in chosen]
            fit_sites(fam, model, pns, batches[: cfg.fit_batches])
        torch.manual_seed(ctx.seed)
        dcfg = DistillConfig(
            steps=cfg.steps, lr=cfg.lr, accumulate=cfg.accumulate, seed=ctx.seed, output_weight=1.0, layers_weight=1.0
        )
        trained = distill(model, teacher, batches, dcfg, ctx, before_step=_train_norms, after_step=_advance)
        model.eval()
        gammas = [get_site(fam, model, s).gamma() for s in chosen]
        for site in chosen:
            set_site(fam, model, site, get_site(fam, model, site).repbn)
        if cfg.fold:
            result.norms, result.biased = fold_norms(fam, model, chosen)
        else:
            result.norms = {s: "repbn" for s in chosen}
        ctx.result = result.model_dump(mode="json")
        ctx.metrics["reparam"] = {
            "sites": len(chosen),
            "schedule": {
                "warmup": cfg.warmup,
                "decay": cfg.schedule_steps,
                "steps": cfg.steps,
                "gamma_end": max(gammas) if gammas else 0.0,
            },
            "loss_first": trained.loss_first,
            "loss_last": trained.loss_last,
            "summary": result.summary(),
        }
        return model

    def restructure(self, model: nn.Module, edit: Edit, family: Family) -> nn.Module:
        res = ReparamResult.model_validate(edit.result)
        if res.sla_layers:
            if res.sla_tokens is None or res.sla_grid is None:
                raise SqueezeError("reparam manifest: SLA layers without their token grid")
            swap_attention(family, model, res.sla_tokens, res.sla_grid)
        rebuild(family, model, res.norms, res.biased)
        return model
