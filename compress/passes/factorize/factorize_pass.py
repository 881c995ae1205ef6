"""``factorize``: DSFormer dense x sparse factorization with the Straight-Through Factorizer.

    squeeze factorize CKPT -o OUT [--ratio 0.5 | --rank K --nnz S] [--pattern column|nm]
                      [--targets attn,mlp] [--stf-steps 300] [--data FILE]

Every targeted linear W (out, in) becomes a :class:`DSLinear` ``y = D (S x) + b`` with D
(out, k) dense and S (k, in) holding exactly s non-zeros per column (ALGORITHMS.md section 3):

1. **Budget** (``budget.py``): ``ratio`` of the linear's stored weight bytes, D + S values +
   S indices at their real dtypes; k is the largest rank whose s = density * k fits. ``rank`` /
   ``nnz`` set them directly (clamped to min(out, in) per layer). ``allocation="error"`` spends
   the same total where the measured reconstruction error drops most per byte (``allocate.py``).
2. **Initialization** (``solver.py``): alternating minimization warm-started from the truncated
   SVD (S-step: top-s of the least-squares code + refit, or OMP; D-step: least squares).
3. **STF** (``stf.py``, ``stf_steps > 0``): every factorized linear trains a dense latent that is
   projected onto the dense-sparse set in every forward pass (gradient straight through), with
   the distillation engine against the unfactorized model; then ``finetune_steps`` of D and the
   S values themselves on the frozen support.

Linears are read through the family (GPT-2's Conv1D stores its weight transposed). The manifest
result lists each factorized linear's shape, rank and nnz, so ``restructure`` rebuilds them.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar, Literal, cast

import torch
from pydantic import BaseModel, Field, field_validator, model_validator
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family
from squeeze.compress.passes.base import Edit, Pass, PassConfig, PassContext
from squeeze.compress.passes.factorize.budget import choose, factor_bytes, nnz_for
from squeeze.compress.passes.factorize.dslinear import DSLinear
from squeeze.compress.passes.factorize.solver import factorize

log = logging.getLogger(__name__)

SUPPORTED = ("bert", "vit", "llama", "gpt2")
#: target groups and the linear roles (``Family.linears`` keys, before the ``.i`` suffix) they name
GROUPS = {"attn": ("q", "k", "v", "qkv", "attn_out"), "mlp": ("mlp_in", "mlp_out")}
ROLES = tuple(r for rs in GROUPS.values() for r in rs)
DEFAULT_DENSITY = (
    0.25  # s / k; measured on all-MiniLM-L6-v2 (budget 50%): 0.25 gave the lowest error on 3 of 4 layer types
)


class FactorizeConfig(PassConfig):
    """Settings of the factorize pass. Either ``ratio`` or ``rank`` (+ ``nnz``); default ratio 0.5."""

    ratio: float | None = None
    rank: int | None = Field(None, ge=1)
    nnz: int | None = Field(None, ge=1)
    density: float = Field(DEFAULT_DENSITY, gt=0, le=1, description="s / k under a ratio budget")
    allocation: Literal["uniform", "error"] = Field(
        "uniform", description="uniform: every linear gets ratio of its bytes; error: the total by measured error"
    )
    alloc_iters: int = Field(2, ge=0, le=1000, description="alternating steps per candidate of the error allocation")
    pattern: Literal["column", "nm"] = "column"
    nm_group: int = Field(4, ge=2, le=64, description="m of an N:M pattern (rows of S per group)")
    targets: tuple[str, ...] = ("attn", "mlp")
    layers: tuple[int, ...] | None = None
    iters: int = Field(10, ge=0, le=1000, description="alternating-minimization iterations")
    coder: Literal["topk", "omp"] = "topk"
    stf_steps: int = Field(0, ge=0, le=1_000_000)
    stf_lr: float = Field(1e-4, gt=0, le=1)
    project_steps: int = Field(1, ge=1, le=100, description="alternating steps per STF projection")
    finetune_steps: int = Field(0, ge=0, le=1_000_000)
    finetune_lr: float = Field(5e-5, gt=0, le=1)
    data: str = Field(
        "auto", description="training text for STF: auto (wiki, else builtin), wiki, spans, builtin, a file"
    )
    samples: int = Field(2048, ge=1, le=1_000_000, description="training samples")
    seq_len: int = Field(128, ge=4, le=32_768)
    batch_size: int = Field(16, ge=1, le=4096)
    loss: Literal["output", "layers"] = Field("layers", description="output only, or + every layer's hidden state")

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"ratio must be in (0, 1] (a share of the linear's bytes), got {v}")
        return v

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        items = [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else list(v)
        bad = [t for t in items if t not in GROUPS and t not in ROLES]
        if bad or not items:
            known = ", ".join((*GROUPS, *ROLES))
            raise ValueError(f"unknown target role {bad[0] if bad else '(none)'!r}; known: {known}")
        return tuple(items)

    @model_validator(mode="after")
    def _consistent(self) -> FactorizeConfig:
        if self.ratio is not None and (self.rank is not None or self.nnz is not None):
            raise ValueError("give either ratio or rank (+ nnz), not both")
        if self.nnz is not None and self.rank is None:
            raise ValueError("nnz needs rank")
        if self.rank is not None and self.nnz is not None and self.nnz > self.rank:
            raise ValueError(f"nnz ({self.nnz}) must not exceed rank ({self.rank})")
        if self.allocation == "error" and self.rank is not None:
            raise ValueError("allocation error shares a --ratio budget between layers; it does not take --rank")
        if self.pattern == "nm" and self.coder == "omp":
            raise ValueError("the N:M pattern uses the top-k coder")
        return self

    @property
    def roles(self) -> set[str]:
        return {r for t in self.targets for r in GROUPS.get(t, (t,))}

    @property
    def budget_ratio(self) -> float | None:
        return self.ratio if self.ratio is not None else (None if self.rank is not None else 0.5)


class LinearSpec(BaseModel):
    """What ``restructure`` needs for one factorized linear, and how well it was fitted."""

    in_features: int
    out_features: int
    rank: int
    nnz: int
    bias: bool
    init_error: float  # ||W - D S|| / ||W|| after alternating minimization
    svd_error: float  # the same for the truncated SVD of equal (or smaller) bytes
    bytes_before: int
    bytes_after: int


class FactorizeResult(BaseModel):
    """The manifest result: every factorized linear by layer index and role key."""

    linears: dict[str, dict[str, LinearSpec]]
    pattern: str = "column"
    stf: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None
    allocation: dict[str, Any] | None = None  # the error allocation's summary (uniform: None)


def svd_error_at_bytes(w: torch.Tensor, n_bytes: int, elem: int = 4) -> float:
    """Relative error of the truncated SVD (stored as two dense factors) within ``n_bytes``."""
    out_f, in_f = w.shape
    k = min(min(out_f, in_f), n_bytes // ((out_f + in_f) * elem))
    sig = torch.linalg.svdvals(w.double())
    return float(sig[k:].square().sum().sqrt() / sig.square().sum().sqrt())


def targets(model: nn.Module, family: Family, cfg: FactorizeConfig) -> list[tuple[int, str, nn.Module]]:
    """(layer index, role key, module) of every linear the config targets."""
    found = []
    for i, layer in enumerate(family.layers(model)):
        if cfg.layers is not None and i not in cfg.layers:
            continue
        for key, mod in family.linears(layer).items():
            if key.partition(".")[0] in cfg.roles:
                found.append((i, key, mod))
    return found


class FactorizePass(Pass):
    name: ClassVar[str] = "factorize"
    Config: ClassVar[type[PassConfig]] = FactorizeConfig
    needs_calibration: ClassVar[bool] = True

    def check(self, family: Family, models: list[nn.Module] | None = None) -> None:
        cfg = cast(FactorizeConfig, self.config)
        if family.name not in SUPPORTED:
            raise SqueezeError(f"factorize supports the {', '.join(SUPPORTED)} families, not {family.name!r}")
        for model in models or []:
            found = targets(model, family, cfg)
            if not found:
                raise SqueezeError(f"no linear of this {family.name} model matches --targets {','.join(cfg.targets)}")
            bad = [k for _, k, m in found if not family.is_linear(m)]
            if bad:
                raise SqueezeError(f"{bad[0]} is already factorized or quantized; factorize the float checkpoint")
            if cfg.layers is not None and max(cfg.layers) >= family.num_layers(model):
                raise SqueezeError(f"--layers {max(cfg.layers)} is out of range ({family.num_layers(model)} layers)")

    def plan(self, out_f: int, in_f: int) -> tuple[int, int]:
        cfg = cast(FactorizeConfig, self.config)
        ratio = cfg.budget_ratio
        if ratio is not None:
            return choose(out_f, in_f, ratio, cfg.density, pattern=cfg.pattern, m=cfg.nm_group)
        k = min(cfg.rank or 1, out_f, in_f)
        s = min(cfg.nnz, k) if cfg.nnz is not None else nnz_for(k, cfg.density, cfg.pattern, cfg.nm_group)
        return k, s

    def allocate(self, weights: list[torch.Tensor], ctx: PassContext) -> tuple[list | None, dict[str, Any] | None]:
        """Per-linear candidates chosen by measured error (``allocation="error"``), else (None, None)."""
        cfg = cast(FactorizeConfig, self.config)
        ratio = cfg.budget_ratio
        if cfg.allocation != "error" or ratio is None:
            return None, None
        from squeeze.compress.passes.factorize.allocate import allocate

        chosen, summary = allocate(
            weights,
            ratio,
            cfg.density,
            pattern=cfg.pattern,
            m=cfg.nm_group,
            iters=cfg.alloc_iters,
            coder=cfg.coder,
            step=lambda i, n: ctx.step("allocate", i, n),
        )
        return chosen, summary

    def apply(self, models: list[nn.Module], ctx: PassContext) -> nn.Module:
        cfg = cast(FactorizeConfig, self.config)
        family = ctx.family
        self.check(family, models)
        model = models[0]
        teacher = copy.deepcopy(model).eval() if cfg.stf_steps or cfg.finetune_steps else None
        found = targets(model, family, cfg)
        specs: dict[str, dict[str, LinearSpec]] = {}
        chosen, alloc = self.allocate([family.linear_weight(m).detach() for _, _, m in found], ctx)
        for n, (i, key, mod) in enumerate(found):
            w = family.linear_weight(mod).detach()  # (out, in) for Linear and Conv1D alike
            out_f, in_f = w.shape
            k, s = self.plan(out_f, in_f) if chosen is None else (chosen[n].k, chosen[n].s)
            if chosen is not None and cfg.alloc_iters == cfg.iters:  # measured with the same steps
                f, errs = chosen[n].factors, [chosen[n].error]
            else:
                f, errs = factorize(w, k, s, iters=cfg.iters, coder=cfg.coder, pattern=cfg.pattern, m=cfg.nm_group)
            bias = cast(torch.Tensor, mod.bias).detach() if mod.bias is not None else None
            ds = DSLinear.from_factors(f, bias, dtype=w.dtype)
            family.set_linear(family.layers(model)[i], key, ds)
            elem = w.element_size()
            after = factor_bytes(out_f, in_f, k, s, elem)
            specs.setdefault(str(i), {})[key] = LinearSpec(
                in_features=in_f,
                out_features=out_f,
                rank=k,
                nnz=s,
                bias=bias is not None,
                init_error=min(errs),
                svd_error=svd_error_at_bytes(w, after, elem),
                bytes_before=out_f * in_f * elem,
                bytes_after=after,
            )
            ctx.step("factorize", n + 1, len(found))
        result = FactorizeResult(linears=specs, pattern=cfg.pattern, allocation=alloc)
        if teacher is not None:
            from squeeze.compress.passes.factorize.train import finetune, train_stf, training_data

            source, data = training_data(ctx, cfg)
            if cfg.stf_steps:
                result.stf = {"data": source, **train_stf(model, teacher, data, cfg, ctx)}
            if cfg.finetune_steps:
                result.finetune = {"data": source, **finetune(model, teacher, data, cfg, ctx)}
        ctx.result.update(result.model_dump(mode="json"))
        flat = [s for layer in specs.values() for s in layer.values()]
        ctx.metrics.update(
            {
                "factorized_linears": len(flat),
                "allocation": cfg.allocation if alloc is not None else "uniform",
                "linear_bytes_before": sum(s.bytes_before for s in flat),
                "linear_bytes_after": sum(s.bytes_after for s in flat),
                "linear_ratio": round(sum(s.bytes_after for s in flat) / sum(s.bytes_before for s in flat), 4),
                "init_error_mean": round(sum(s.init_error for s in flat) / len(flat), 4),
                "svd_error_mean": round(sum(s.svd_error for s in flat) / len(flat), 4),
            }
        )
        return model

    def restructure(self, model: nn.Module, edit: Edit, family: Family) -> nn.Module:
        result = FactorizeResult.model_validate(edit.result)
        layers = family.layers(model)
        for idx, specs in result.linears.items():
            for key, s in specs.items():
                family.set_linear(
                    layers[int(idx)], key, DSLinear(s.in_features, s.out_features, s.rank, s.nnz, bias=s.bias)
                )
        return model
