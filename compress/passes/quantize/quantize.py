"""``quantize``: RepQuant-style post-training quantization (RepQ-ViT, RepQuant, BCT).

    squeeze quantize CKPT -o OUT [--weights int8|int6|int4] [--activations int8|int6|int4|dynamic|none]
                          [--method repquant|minmax|percentile|bct] [--calib FILE] [--samples N]

Methods (ALGORITHMS.md section 4):

* ``repquant`` (default): per-output-channel weights on a percentile/MSE grid, rounded by GPTQ
  on the reparameterized weights. With static activations: RepQuant's learned per-channel dual
  clipping of the inputs of q/k/v, the MLP input and the MLP output, reparameterized into the
  input norm (pre-norm families) or an explicit per-channel affine, with z~ rounded so the
  integer codes are bit-identical; per-tensor percentile/MSE ranges elsewhere; log-sqrt2
  post-softmax quantization. With ``--activations dynamic`` (the default): ONNX Runtime picks the
  activation codes at run time, so squeeze picks and rounds the weights, after a per-group
  smoothing scale chosen by measuring the error under ORT's own dynamic quantization.
* ``minmax`` / ``percentile``: plain baselines (round to nearest, per-tensor activations,
  uniform softmax), the ledger compares against them.
* ``bct``: block-wise quantization (scales per block of ``block_size`` channels) of every
  weight, embedding and linear input; q/k/v and softmax per tensor.

Why dynamic is the default: it is what serves a CPU / ONNX Runtime deployment best. It exports
to exactly the integer pattern ``quantize_dynamic`` writes (ORT fuses it into
``DynamicQuantizeMatMul``), so latency and size match ORT's own, while squeeze's weights are
chosen for the measured output error instead of round-to-nearest. Static activations export as
QDQ (``QuantizeLinear`` + ``MatMulIntegerToFloat`` in ORT, int8 in TensorRT) and need real
calibration data.
"""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar, Literal, cast

import torch
from pydantic import ConfigDict, Field, field_validator, model_validator
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family
from squeeze.compress.passes.base import Edit, ExportRule, Pass, PassConfig, PassContext, PassResult
from squeeze.compress.passes.quantize import names, target

log = logging.getLogger(__name__)

SUPPORTED = ("bert", "vit", "llama", "gpt2", "mpnet", "distilbert", "gemma", "phi3")
_BITS = re.compile(r"^int(\d+)$")


def _bits(value: str, what: str, allowed: tuple[str, ...]) -> str:
    if value in allowed:
        return value
    m = _BITS.match(str(value))
    if not m or not 2 <= int(m.group(1)) <= 16:
        extra = "|".join(allowed)
        raise ValueError(
            f"{what}: expected int2..int16 (int8, int6, int4){' or ' + extra if extra else ''}, got {value!r}"
        )
    return value


class QuantizeConfig(PassConfig):
    """Settings of the quantize pass (bits as ``intN``)."""

    weights: str = "int8"
    activations: str = "dynamic"
    method: Literal["repquant", "minmax", "percentile", "bct"] = "repquant"
    gptq: bool = True  # repquant's weight rounding; the baselines always round to nearest
    block_size: int = Field(64, ge=8, le=4096)  # bct
    embeddings: bool = True  # quantize embedding tables (uint8), as quantize_dynamic does
    clip_steps: int = Field(50, ge=0, le=10_000)  # dual-clipping optimisation steps (static)
    # static repquant: also reparameterize the MLP output linear's input per channel (squeeze's
    # extension beyond RepQ-ViT; measured in benchmarks/results/quant_ablation.md)
    fc2_reparam: bool = True
    alphas: tuple[float, ...] = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)  # smoothing strengths tried (dynamic)
    # static only; auto: log-sqrt2 for repquant up to 8 bits. Its levels are sqrt(2) apart at any
    # width (more bits only reach smaller probabilities), so above 8 bits a uniform grid is finer.
    softmax: Literal["auto", "logsqrt2", "uniform", "float"] = "auto"
    # tensorrt: symmetric int8 Q/DQ (zero point 0) that TensorRT builds (compress/passes/quantize/target.py)
    target: Literal["ort", "tensorrt"] = "ort"
    format: Literal["squeeze", "compressed-tensors"] = "squeeze"  # the folder's layout (compress/formats_ct.py)

    @field_validator("weights")
    @classmethod
    def _w(cls, v: str) -> str:
        return _bits(v, "weights", ())

    @field_validator("activations")
    @classmethod
    def _a(cls, v: str) -> str:
        return _bits(v, "activations", ("dynamic", "none"))

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0.0 <= a <= 1.0 for a in v):
            raise ValueError("alphas must be a non-empty list of values in [0, 1]")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> QuantizeConfig:
        target.check(self)
        if self.activations == "dynamic" and self.w_bits > 8:
            raise ValueError("dynamic activations run ORT's int8 kernels: weights must be int8 or fewer bits")
        if self.activations == "dynamic" and self.method == "bct":
            raise ValueError(
                "bct scales weights per block, which MatMulInteger cannot consume: use --activations int8 or none"
            )
        if self.format == "compressed-tensors":
            from squeeze.compress.formats_ct import config_problem

            problem = config_problem(self.w_bits, self.activations, self.method)
            if problem is not None:
                raise ValueError(problem)
        return self

    @property
    def w_bits(self) -> int:
        return int(self.weights[3:])

    @property
    def a_bits(self) -> int:
        return 8 if self.activations in ("dynamic", "none") else int(self.activations[3:])

    @property
    def act_mode(self) -> str:
        if self.activations in ("dynamic", "none"):
            return self.activations
        return "block" if self.method == "bct" else "static"

    @property
    def static(self) -> bool:
        return self.act_mode in ("static", "block")


def family_notes(family: Family, cfg: QuantizeConfig, model: nn.Module) -> tuple[list[str], list[str]]:
    """(warnings, notes): steps with no equivalent in this family, and how others were mapped."""
    warn: list[str] = []
    notes: list[str] = []
    if family.norm_kind == "rmsnorm" and cfg.method == "repquant" and cfg.static:
        warn.append(
            "rmsnorm has no bias to absorb the reparameterization's zero-point shift: the per-channel "
            "clipping bounds of the norm-fed inputs are symmetric (scale-only reparameterization)"
        )
    if (
        family.num_kv_heads(model.config) != family.num_heads(model.config)
        and cfg.method == "repquant"
        and cfg.activations == "dynamic"
    ):
        warn.append(
            "grouped-query attention shares v between heads: the attention-output smoothing cannot fold into v "
            "and stays an explicit per-channel Mul"
        )
    if family.conv1d:
        notes.append(
            "Conv1D weights are quantized in (out, in) layout; the fused qkv is one linear with one input quantizer"
        )
    if family.norm_placement == "post" and cfg.method == "repquant" and cfg.activations != "none":
        notes.append(
            "post-LN: the norm output also feeds the residual, so the reparameterization of the q/k/v and MLP "
            "inputs is an explicit per-channel affine before the quantizer, not folded into the LayerNorm"
        )
    if family.head_module(model) is not None:
        notes.append("the head (classifier / LM head) stays float")
    if family.modality == "vision":
        notes.append("the patch-embedding convolution stays float")
    if cfg.static:
        notes.append("attention scores and the additive attention mask stay float (only matmul inputs are quantized)")
    return warn, notes


class QuantizeResult(PassResult):
    """The manifest result of ``quantize``: the spec of every quantized linear (layer -> key ->
    spec), of every quantized embedding table, and the quantized attention layers (static)."""

    model_config = ConfigDict(extra="forbid")

    linears: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)
    embeddings: dict[str, dict[str, Any]] = Field(default_factory=dict)
    attention: dict[str, Any] | None = None
    factorized: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)  # factorize's int8 DSLinears

    def summary(self) -> list[str]:
        n_lin = sum(len(v) for v in self.linears.values())
        return [f"{n_lin} linears, {len(self.embeddings)} embedding tables quantized"]


class QuantizePass(Pass):
    name: ClassVar[str] = "quantize"
    Config: ClassVar[type[PassConfig]] = QuantizeConfig
    Result: ClassVar[type[PassResult]] = QuantizeResult

    def summary(self, result: PassResult | dict[str, Any]) -> list[str]:
        """The scheme (from the typed config), then the result's counts."""
        cfg = cast(QuantizeConfig, self.config)
        res = result if isinstance(result, QuantizeResult) else QuantizeResult.model_validate(result)
        gptq = "GPTQ" if cfg.gptq and cfg.method == "repquant" else "round to nearest"
        act = cfg.act_mode + (f" int{cfg.a_bits}" if cfg.static else "")
        ran = names.algorithm(cfg.method, cfg.act_mode, cfg.gptq and cfg.method == "repquant")
        return [f"weights int{cfg.w_bits} ({gptq}), activations {act}, method {cfg.method} ({ran}): {res.summary()[0]}"]

    needs_calibration: ClassVar[bool] = True

    def check(self, family: Family, models: list[nn.Module] | None = None) -> None:
        from squeeze.compress.passes.quantize.modules import QuantEmbedding, QuantLinear

        if family.name not in SUPPORTED:
            raise SqueezeError(f"quantize supports the {', '.join(SUPPORTED)} families, not {family.name!r}")
        if self.config.static and not family.attention_interface:
            raise SqueezeError(
                f"static activations quantize attention through transformers' AttentionInterface, which "
                f"{family.name} does not use: choose --activations dynamic or none"
            )
        for model in models or []:
            if any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
                raise SqueezeError("this checkpoint is already quantized; quantize the float checkpoint instead")
            from squeeze.compress.passes.factorize import int8 as factorized  # DSLinear -> int8 D, S

            factorized.check(family, model, self.config.w_bits)
            if self.config.format == "compressed-tensors":  # what that format cannot hold, before any work
                from squeeze.compress import formats, formats_ct

                cfg = self.config
                plain = formats.plain_reason(model, family)
                formats_ct.check(family, model, cfg.activations, cfg.method, cfg.alphas, plain)

    def check_data(self, ctx: PassContext) -> None:
        """Static activation ranges need real calibration data."""
        cfg = cast(QuantizeConfig, self.config)
        if not cfg.static:
            return
        source = ctx.calibration.source if ctx.calibration is not None else "builtin"
        fam = ctx.family
        if source == "synthetic":
            raise SqueezeError(
                "static activation quantization needs real calibration data (--data FILE), not synthetic"
            )
        if fam.modality == "vision" and source == "builtin":
            raise SqueezeError(
                "static activation quantization of an image model needs calibration images "
                "(--data an .npz or an image folder)"
            )
        if fam.modality == "text" and ctx.checkpoint is not None and ctx.checkpoint.tokenizer() is None:
            raise SqueezeError("static activation quantization needs real text, but this checkpoint has no tokenizer")

    def scheme(self, seed: int = 0):
        from squeeze.compress.passes.quantize.engine import Scheme

        cfg = cast(QuantizeConfig, self.config)
        softmax = cfg.softmax
        if softmax == "auto":
            softmax = "logsqrt2" if cfg.method == "repquant" and cfg.a_bits <= 8 else "uniform"
        return Scheme(
            w_bits=cfg.w_bits,
            act=cfg.act_mode,
            a_bits=cfg.a_bits,
            method=cfg.method,
            gptq=cfg.gptq and cfg.method == "repquant",
            block_size=cfg.block_size,
            embeddings=cfg.embeddings,
            clip_steps=cfg.clip_steps,
            alphas=cfg.alphas,
            softmax=softmax,
            seed=seed,
            fc2_reparam=cfg.fc2_reparam,
        )

    def apply(self, models: list[nn.Module], ctx: PassContext) -> nn.Module:
        from squeeze.compress.passes.quantize.engine import quantize_model

        model = models[0]  # a copy (run_pass), checked once before any work
        scheme = target.adapt(self.scheme(ctx.seed), self.config)  # target tensorrt: signed, float attention
        warnings, notes = family_notes(ctx.family, cast(QuantizeConfig, self.config), model)
        notes += target.notes(self.config)
        for w in warnings:
            ctx.warn(w)
        from squeeze.compress.passes.factorize import int8 as factorized

        ds_specs, ds_warnings = factorized.quantize(model, ctx.family, scheme.w_bits)  # before the walk
        for w in ds_warnings:
            ctx.warn(w)
        batches = ctx.calib_batches()
        torch.manual_seed(ctx.seed)
        with torch.enable_grad():  # the clipping bounds are learned
            result, metrics = quantize_model(model, ctx.family, batches, scheme, step=ctx.step)
        n_lin = sum(len(v) for v in result["linears"].values())
        ctx.result = QuantizeResult(**result, factorized=ds_specs)
        metrics["quantized_factorized_linears"] = sum(len(v) for v in ds_specs.values())
        ctx.metrics.update(
            {
                "scheme": {
                    "weights": scheme.w_bits,
                    "activations": scheme.act,
                    "activation_bits": scheme.a_bits,
                    "method": scheme.method,
                    "gptq": scheme.gptq,
                    "softmax": scheme.softmax if self.config.static else None,
                    # what ran (issue 17): --method repquant with dynamic activations is smoothquant+gptq
                    "algorithm": names.algorithm(scheme.method, scheme.act, scheme.gptq),
                    "extensions": names.extensions(scheme.method, scheme.act, scheme.fc2_reparam),
                },
                "quantized_linears": n_lin,
                "quantized_embeddings": len(result["embeddings"]),
                "notes": notes,
                **metrics,
            }
        )
        return model

    def export_rule(self, edit: Edit) -> ExportRule:
        """Cosine and relative max error against the PyTorch twin (one rounding flip cascades)."""
        from squeeze.compress.passes.quantize.onnx_check import rule_for

        cfg = cast(QuantizeConfig, self.config)
        return ExportRule(**rule_for(cfg.w_bits, cfg.activations, cfg.a_bits))

    def restructure(self, model: nn.Module, edit: Edit, family: Family) -> nn.Module:
        from squeeze.compress.passes.factorize import int8 as factorized
        from squeeze.compress.passes.quantize.engine import rebuild

        result = self.result_of(edit).model_dump()
        return factorized.rebuild(rebuild(model, family, result), family, result["factorized"])
