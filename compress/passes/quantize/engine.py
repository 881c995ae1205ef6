"""The quantization procedure, layer by layer, and its replay from the manifest.

``quantize_model`` walks the transformer layers in order (``capture.Layerwise``: each layer runs
on the outputs of the already quantized layers before it, O(L) layer forwards in all, where the
former prefix re-runs cost O(L^2)). For layer i it runs the layer over the calibration batches,
capturing the input of every linear group; decides each group's transform, input quantizer and
integer weights (``groups.py``); swaps the linears for :class:`QuantLinear`; then, with static
activations, runs the layer once more to calibrate the attention quantizers of layer i on the inputs the
quantized linears now produce (RepQ-ViT's re-calibration pass). Embedding tables are quantized
last. Everything ``restructure`` needs is returned as a JSON-able ``result``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from squeeze.compress.calibration import Batch
from squeeze.compress.capture import Layerwise, record
from squeeze.compress.families import Family
from squeeze.compress.passes.quantize import attention as qattn
from squeeze.compress.passes.quantize import groups as G
from squeeze.compress.passes.quantize import reparam, target
from squeeze.compress.passes.quantize.modules import ChannelAffine, QuantEmbedding, QuantLinear
from squeeze.compress.passes.quantize.uniform import Grid, minmax_range, params_from_range, quantize

log = logging.getLogger(__name__)

MAX_TOKENS = 4096  # tokens per group used by the alpha search and the clipping optimisation


@dataclass(frozen=True)
class Scheme:
    """The resolved settings of one quantization run."""

    w_bits: int
    act: str  # dynamic | static | block | none
    a_bits: int
    method: str  # repquant | minmax | percentile | bct
    gptq: bool
    block_size: int
    embeddings: bool
    clip_steps: int
    alphas: tuple[float, ...]
    softmax: str  # logsqrt2 | uniform | float  (static only)
    seed: int = 0
    signed_act: bool = False  # symmetric int8 activation quantizers (target tensorrt: target.py)
    fc2_reparam: bool = True  # static repquant: MLP output input per channel (squeeze's extension)


def n_blocks(channels: int, block_size: int) -> int:
    """Blocks of at most ``block_size`` channels that tile ``channels`` exactly (BCT)."""
    size = max(d for d in range(1, min(block_size, channels) + 1) if channels % d == 0)
    return channels // size


# --------------------------------------------------------------------------------------------
# Groups of one layer
# --------------------------------------------------------------------------------------------


def layer_groups(family: Family, model: nn.Module, layer: nn.Module) -> list[G.Group]:
    """The linear groups of one layer (skipped sublayers have none)."""
    out: list[G.Group] = []
    lins = family.linears(layer)
    if not family.is_skipped(layer, "attn"):
        keys = ["qkv"] if "qkv" in lins else ["q", "k", "v"]
        out.append(G.Group("attn_in", keys, [lins[k] for k in keys], norm=family.input_norm(layer, "attn")))
        producer = None
        v_plain = family.is_linear(lins["qkv" if "qkv" in lins else "v"])  # not factorize's DSLinear
        if family.num_kv_heads(model.config) == family.num_heads(model.config) and v_plain:
            if "qkv" in lins:  # fused (GPT-2): v is the last third of the output rows
                d = family.linear_weight(lins["qkv"]).shape[0] // 3
                producer = (lins["qkv"], slice(2 * d, 3 * d))
            else:
                producer = (lins["v"], slice(None))
        out.append(G.Group("attn_out", ["attn_out"], [lins["attn_out"]], producer=producer))
    if not family.is_skipped(layer, "mlp"):
        keys = sorted(k for k in lins if k.startswith("mlp_in"))
        out.append(G.Group("mlp_in", keys, [lins[k] for k in keys], norm=family.input_norm(layer, "mlp")))
        out.append(G.Group("mlp_out", ["mlp_out"], [lins["mlp_out"]]))
    return out


# --------------------------------------------------------------------------------------------
# Calibration capture
# --------------------------------------------------------------------------------------------


@dataclass
class Captured:
    """Inputs of one tap over the calibration batches: every token of every batch (what a
    run-time dynamic range sees, padding included) and which rows are real tokens."""

    batches: list[torch.Tensor]  # (B*T, C) per batch
    masks: list[torch.Tensor | None]  # (B*T,) bool per batch, None when there is no padding

    @property
    def real(self) -> torch.Tensor:
        """(N, C): real tokens only (padding outputs never reach the result)."""
        return torch.cat([x if m is None else x[m] for x, m in zip(self.batches, self.masks)])

    @property
    def every(self) -> torch.Tensor:
        return torch.cat(self.batches)


def capture_inputs(walk: Layerwise, taps: dict[str, nn.Module]) -> dict[str, Captured]:
    """Run the walk's current layer once over its inputs; capture the first input of each tap
    module, with each batch's padding mask (None when the batch has no padding)."""
    with record(taps, what="input") as seen:
        walk.run()
    masks = [m.bool() if m is not None and not bool(m.all()) else None for m in walk.masks]
    out: dict[str, Captured] = {}
    for key, xs in seen.items():
        if not xs:
            continue
        cap = Captured([], [])
        per_batch = len(xs) == len(masks)  # one call per batch: each input gets its batch's mask
        for j, x in enumerate(xs):
            mask = masks[j] if per_batch else None
            cap.batches.append(x.reshape(-1, x.shape[-1]).float())
            cap.masks.append(mask.reshape(-1) if mask is not None and mask.shape == x.shape[:2] else None)
        out[key] = cap
    return out


# --------------------------------------------------------------------------------------------
# Quantize
# --------------------------------------------------------------------------------------------


def _decide(group: G.Group, cap: Captured, scheme: Scheme, family: Family) -> G.Decision:
    """Transform and input quantizer of one group (weights are rounded afterwards)."""
    weights = G.consumer_weights(group, family.linear_weight)
    x = cap.real
    sample = G.sample_rows(x, MAX_TOKENS, scheme.seed)
    dec = G.Decision()
    rmsnorm = family.norm_kind == "rmsnorm"
    if scheme.method == "repquant" and scheme.act == "dynamic":
        # ORT's run-time range covers padding tokens too, so the search sees whole batches
        r, alpha, errs = G.smoothing_search(cap.batches, weights, scheme.w_bits, scheme.alphas, MAX_TOKENS)
        dec.info = {"alpha": alpha, "err": round(errs[alpha], 6), "err_alpha0": round(errs.get(0.0, float("nan")), 6)}
        if alpha > 0:
            dec.r, dec.delta = r, torch.zeros_like(r)
    elif (
        scheme.method == "repquant"
        and scheme.act == "static"
        and group.name != "attn_out"
        and (group.name != "mlp_out" or scheme.fc2_reparam)
    ):
        symmetric = (rmsnorm and group.norm is not None) or scheme.signed_act
        rp, info = G.repquant_reparam(sample, weights, scheme.a_bits, scheme.clip_steps, symmetric, scheme.seed)
        dec.r, dec.delta, dec.a_scale, dec.a_zero, dec.info = rp.r, rp.delta, rp.scale, rp.zero, info
        if scheme.signed_act:
            dec.a_zero = target.signed_zero(dec.a_zero, scheme.a_bits)
    if dec.r is not None:
        if group.norm is not None:
            dec.where = "norm"
        elif group.producer is not None and not bool((dec.delta != 0).any()):
            dec.where = "producer"
        else:
            dec.where = "affine"
    if scheme.act in ("static", "block") and dec.a_scale is None:
        xt = x if dec.r is None else x / dec.r - dec.delta
        blocks = n_blocks(x.shape[1], scheme.block_size) if scheme.act == "block" else 1
        if scheme.signed_act:
            dec.a_scale, dec.a_zero = target.signed_range(xt, scheme.a_bits, scheme.method)
        else:
            dec.a_scale, dec.a_zero = G.static_range(xt, scheme.a_bits, scheme.method, blocks)
    return dec


def _apply_group(
    layer: nn.Module, group: G.Group, dec: G.Decision, cap: Captured, scheme: Scheme, family: Family
) -> dict[str, Any]:
    """Fold the transform, round the weights, swap in QuantLinears; return their manifest spec."""
    x = cap.real
    affine = None
    if dec.where == "norm":
        reparam.fold_into_norm(group.norm, dec.r, dec.delta)
    elif dec.where == "producer":  # the producer's outputs become x / r
        prod, rows = group.producer
        w = family.linear_weight(prod).detach().clone()
        w[rows] = w[rows] / dec.r[:, None]
        family.set_linear_weight(prod, w)
        if prod.bias is not None:
            with torch.no_grad():
                prod.bias[rows] /= dec.r
    elif dec.where == "affine":
        shift = bool((dec.delta != 0).any())
        affine = ChannelAffine(x.shape[1], shift=shift)
        with torch.no_grad():
            affine.scale.copy_(1.0 / dec.r)
            if shift:
                affine.shift.copy_(-dec.delta)
    xt = x if dec.r is None else x / dec.r - dec.delta
    xt_fit = G.sample_rows(xt, 4 * MAX_TOKENS, scheme.seed)
    specs: dict[str, Any] = {}
    for key, mod in zip(group.keys, group.modules):
        w = family.linear_weight(mod).detach().float()
        b = None if mod.bias is None else mod.bias.detach().float()
        if dec.r is not None:
            w, b = reparam.fold_into_consumer(w, b, dec.r, dec.delta)
        w_blocks = n_blocks(w.shape[1], scheme.block_size) if scheme.method == "bct" else 1
        codes, scale, zero = G.round_weight(w, xt_fit, scheme.w_bits, w_blocks, scheme.method, scheme.gptq)
        spec = {
            "in": int(w.shape[1]),
            "out": int(w.shape[0]),
            "bias": b is not None,
            "w_bits": scheme.w_bits,
            "w_blocks": w_blocks,
            "act": scheme.act,
            "a_bits": scheme.a_bits,
            "a_blocks": n_blocks(w.shape[1], scheme.block_size) if scheme.act == "block" else 1,
            "affine": group.name if affine is not None else None,
            "affine_shift": affine is not None and affine.shift is not None,
            **({"a_signed": True} if scheme.signed_act else {}),
        }
        q = build_linear(spec, affine)
        q.set_weight(codes, scale, zero, b)
        if scheme.act in ("static", "block"):
            q.set_input_quant(dec.a_scale, dec.a_zero)
        family.set_linear(layer, key, q)
        specs[key] = spec
    return specs


def build_linear(spec: dict[str, Any], affine: ChannelAffine | None) -> QuantLinear:
    return QuantLinear(
        spec["in"],
        spec["out"],
        bias=spec["bias"],
        w_bits=spec["w_bits"],
        w_blocks=spec["w_blocks"],
        act=spec["act"],
        a_bits=spec["a_bits"],
        a_blocks=spec["a_blocks"],
        affine=affine,
        a_signed=spec.get("a_signed", False),
    )


#: what choosing a group's input quantizer runs, by (method, activations): the progress sub-step
_SEARCH = {("repquant", "dynamic"): "smoothing search", ("repquant", "static"): "dual clipping / ranges"}
_SEARCH.update({(m, a): "activation ranges" for m in ("minmax", "percentile", "bct") for a in ("static", "block")})


def _substep(step: Callable[[str, int, int], None], i: int, n: int, what: str) -> None:
    """A sub-step of layer i: the progress line names it, the count stays the layer's."""
    step(f"quantize layers: layer {i + 1}/{n}: {what}", i, n)


def quantize_model(
    model: nn.Module,
    family: Family,
    batches: list[Batch],
    scheme: Scheme,
    step: Callable[[str, int, int], None] = lambda *a: None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quantize ``model`` in place. Returns (manifest result, ledger metrics)."""
    layers = family.layers(model)
    attn_layers: list[int] = []
    use_attn = scheme.act in ("static", "block") and scheme.softmax != "float"
    if use_attn:
        qattn.route(model)
    result: dict[str, Any] = {"linears": {}, "embeddings": {}, "attention": None}
    decisions: dict[str, Any] = {}
    walk = Layerwise(model, family, batches)  # after the attention route: the masks follow it
    for i in walk:
        layer = walk.layer
        step("quantize layers", i, len(layers))
        groups = layer_groups(family, model, layer)
        groups = [g for g in groups if all(family.is_linear(m) for m in g.modules)]  # DSLinears: factorize's int8
        if not groups:
            continue
        _substep(step, i, len(layers), "capturing inputs")
        caps = capture_inputs(walk, {g.name: g.first for g in groups})
        specs: dict[str, Any] = {}
        for g in sorted(groups, key=lambda g: g.name != "attn_out"):  # attn_out first: it may fold into v
            if g.name not in caps:
                continue
            _substep(step, i, len(layers), f"{g.name}: {_SEARCH.get((scheme.method, scheme.act), 'inputs')}")
            dec = _decide(g, caps[g.name], scheme, family)
            decisions[f"{i}.{g.name}"] = {"where": dec.where, **dec.info}
            _substep(step, i, len(layers), f"{g.name}: {'GPTQ' if scheme.gptq else 'rounding weights'}")
            specs.update(_apply_group(layer, g, dec, caps[g.name], scheme, family))
        result["linears"][str(i)] = specs
        if use_attn and not family.is_skipped(layer, "attn"):
            _substep(step, i, len(layers), "attention calibration")
            core = family.attention_core(layer)
            st = qattn.AttnQuant(scheme.a_bits, scheme.softmax)
            core.add_module(qattn.CHILD, st)
            st.observing = True
            walk.run()
            st.calibrate(scheme.method)
            attn_layers.append(i)
    forwards = walk.forwards
    step("quantize layers", len(layers), len(layers))
    if use_attn:
        result["attention"] = {"bits": scheme.a_bits, "softmax": scheme.softmax, "layers": attn_layers}
    if scheme.embeddings:
        result["embeddings"] = quantize_embeddings(model, family, scheme)
    return result, {"groups": decisions, "layer_forwards": forwards}


def quantize_embeddings(model: nn.Module, family: Family, scheme: Scheme) -> dict[str, Any]:
    """uint8 tables (wider when the weights are), per-tensor (per block for BCT) min/max ranges."""
    out = {}
    bits = max(8, scheme.w_bits)
    grid = Grid(bits, symmetric=False)
    for key, emb in family.embedding_tables(model):
        w = emb.weight.detach().float()
        blocks = n_blocks(w.shape[1], scheme.block_size) if scheme.method == "bct" else 1
        cols = w.t().reshape(blocks, -1)
        lo, hi = minmax_range(cols, per_channel=True)
        s, z = params_from_range(lo, hi, grid)
        rep = w.shape[1] // blocks
        codes = quantize(w, s.repeat_interleave(rep), z.repeat_interleave(rep), grid)
        spec = {
            "num": int(w.shape[0]),
            "dim": int(w.shape[1]),
            "blocks": blocks,
            "padding_idx": emb.padding_idx,
            "bits": bits,
        }
        q = build_embedding(spec)
        with torch.no_grad():
            q.qweight.copy_(codes.to(q.qweight.dtype))
            q.scale.copy_(s)
            q.zero.copy_(z.to(q.zero.dtype))
        family.set_embedding_table(model, key, q)
        out[key] = spec
    return out


def build_embedding(spec: dict[str, Any]) -> QuantEmbedding:
    return QuantEmbedding(
        spec["num"], spec["dim"], blocks=spec["blocks"], padding_idx=spec["padding_idx"], bits=spec.get("bits", 8)
    )


# --------------------------------------------------------------------------------------------
# Replay (restructure)
# --------------------------------------------------------------------------------------------


def rebuild(model: nn.Module, family: Family, result: dict[str, Any]) -> nn.Module:
    """Re-create the quantized modules from a manifest ``result`` (weights come from the file)."""
    layers = family.layers(model)
    for idx, specs in result.get("linears", {}).items():
        layer = layers[int(idx)]
        affines: dict[str, ChannelAffine] = {}
        for key, spec in specs.items():
            affine = None
            if spec.get("affine"):
                name = spec["affine"]
                if name not in affines:
                    affines[name] = ChannelAffine(spec["in"], shift=spec["affine_shift"])
                affine = affines[name]
            family.set_linear(layer, key, build_linear(spec, affine))
    for key, spec in (result.get("embeddings") or {}).items():
        family.set_embedding_table(model, key, build_embedding(spec))
    att = result.get("attention")
    if att:
        qattn.route(model)
        for i in att["layers"]:
            family.attention_core(layers[i]).add_module(qattn.CHILD, qattn.AttnQuant(att["bits"], att["softmax"]))
    return model
