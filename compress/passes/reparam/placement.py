"""Where SLAB's norms go in each family, and how their eval-mode affine folds away.

Sites are named ``"<layer>:attn_norm"``, ``"<layer>:mlp_norm"`` and ``"final"``; every decision
comes from the family's roles (``attn_norm`` / ``mlp_norm`` / ``final_norm``, their placement,
the linears that read them, the residual writers ``attn_out`` / ``mlp_out``, the head):

* pre-norm (ViT, Llama, GPT-2): a norm's output is read only by its sublayer's input linears
  (q/k/v or the fused qkv; the MLP's input linears). The affine folds into each of them:
  W' = W diag(a), b' = W b + bias (a bias is created where the linear had none, Llama).
* the final norm (pre-head): folds into an untied linear head the same way. Without a head (the
  norm's output *is* the model output) or with a head tied to the embeddings (GPT-2), the
  affine stays as a :class:`ChannelAffine` (one Mul and one Add, no statistics).
* post-LN (BERT): each norm sits after a residual add and its output is the residual stream
  itself. Folding follows SLAB's ``merge_bn`` through the residual writers: the stream is
  carried in per-channel coordinates ``s = h / D``; each norm's affine (a, b) is folded into the
  branch's output linear as the preceding layer (W' = a W, b' = a bias + b, the ``eta * bias``
  term included) followed by the rescale 1 / D_new, with D_new = a * D; the readers of the
  stream get W diag(D). The last layer's norm becomes ``ChannelAffine(D, 0)`` so the output is
  exact. Every norm must be replaced (``--norms all``): a LayerNorm left in the stream would
  read scaled coordinates.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family
from squeeze.compress.passes.reparam.norms import ChannelAffine, RepBN
from squeeze.compress.surgery import fold_linear_reader, fold_linear_writer, set_module, with_bias

FINAL = "final"
MIN_SCALE = 1e-12  # a folded stream coordinate this small cannot be divided out


def sites(family: Family, model: nn.Module, which: str) -> list[str]:
    """The norm sites ``which`` (all | attn | mlp | final) selects, skipped sublayers left out."""
    out: list[str] = []
    if which in ("all", "attn", "mlp"):
        for i, layer in enumerate(family.layers(model)):
            for sub in ("attn", "mlp"):
                if which in ("all", sub) and not family.is_skipped(layer, sub):
                    out.append(f"{i}:{sub}_norm")
    if which in ("all", "final") and family.final_norm is not None:
        out.append(FINAL)
    return out


def get_site(family: Family, model: nn.Module, site: str) -> nn.Module:
    if site == FINAL:
        return family.final_norm_module(model)
    i, _, role = site.partition(":")
    return family.role(family.layers(model)[int(i)], role)


def set_site(family: Family, model: nn.Module, site: str, module: nn.Module) -> None:
    if site == FINAL:
        set_module(family.base(model), family.final_norm, module)
        return
    i, _, role = site.partition(":")
    family.set_role(family.layers(model)[int(i)], role, module)


def reader_keys(family: Family, layer: nn.Module, role: str) -> list[str]:
    """The linears (keys as in ``Family.linears``) that read the output of a pre-norm ``role``."""
    keys = family.linears(layer)
    if role == "attn_norm":
        return ["qkv"] if "qkv" in keys else [k for k in ("q", "k", "v") if k in keys]
    return [k for k in keys if k.startswith("mlp_in")]


def tied_head(family: Family, model: nn.Module) -> bool:
    head = family.head_module(model)
    weight = getattr(head, "weight", None)
    return weight is not None and any(p is weight for e in family.embedding_modules(model) for p in e.parameters())


def _head_foldable(family: Family, model: nn.Module) -> bool:
    head = family.head_module(model)
    return head is not None and family.is_linear(head) and not tied_head(family, model)


def _fold_reader(family: Family, layer: nn.Module, key: str, a, b, tag: str, biased: list[str]) -> None:
    lin = family.linears(layer)[key]
    new = fold_linear_reader(lin, a, b)
    if new is not lin:
        family.set_linear(layer, key, new)
        biased.append(f"{tag}:{key}")


def _fold_writer(family: Family, layer: nn.Module, key: str, a, b, tag: str, biased: list[str]) -> None:
    lin = family.linears(layer)[key]
    new = fold_linear_writer(lin, a, b)
    if new is not lin:
        family.set_linear(layer, key, new)
        biased.append(f"{tag}:{key}")


def fold_norms(family: Family, model: nn.Module, chosen: list[str]) -> tuple[dict[str, str], list[str]]:
    """Fold every eval-mode RepBN at ``chosen`` sites away; return (site -> what stands there now:
    ``identity`` or ``affine``, the linears that gained a bias)."""
    biased: list[str] = []
    state: dict[str, str] = {}
    layers = family.layers(model)
    if family.norm_placement == "post":
        D = None
        for i, layer in enumerate(layers):
            for sub, writer in (("attn", "attn_out"), ("mlp", "mlp_out")):
                site = f"{i}:{sub}_norm"
                repbn = get_site(family, model, site)
                if not isinstance(repbn, RepBN):
                    raise SqueezeError(
                        f"{family.name} (post-LN): every norm must be reparameterized to fold, {site} is not"
                    )
                if D is not None:  # the readers of the stream see s = h / D
                    for key in reader_keys(family, layer, f"{sub}_norm"):
                        _fold_reader(family, layer, key, D, torch.zeros_like(D), str(i), biased)
                a, b = (t.detach() for t in repbn.affine())
                D_new = a if D is None else a * D
                if float(D_new.abs().min()) < MIN_SCALE:
                    raise SqueezeError(f"cannot fold {site}: a RepBN scale is zero in some channel")
                # the norm as the preceding layer's affine, then the stream rescale 1 / D_new
                _fold_writer(family, layer, writer, a / D_new, b / D_new, str(i), biased)
                last = i == len(layers) - 1 and sub == "mlp"
                if last:
                    affine = ChannelAffine(D_new.numel()).to(repbn.weight.dtype)
                    with torch.no_grad():
                        affine.scale.copy_(D_new)
                        affine.shift.zero_()
                    set_site(family, model, site, affine)
                    state[site] = "affine"
                else:
                    set_site(family, model, site, nn.Identity())
                    state[site] = "identity"
                D = D_new
        return state, biased
    for site in chosen:
        repbn = cast(RepBN, get_site(family, model, site))  # a chosen site holds a RepBN
        a, b = (t.detach() for t in repbn.affine())
        if site == FINAL:
            if _head_foldable(family, model):
                head = family.head_module(model)
                new = fold_linear_reader(head, a, b)
                if new is not head:
                    set_module(model, family.head, new)
                    biased.append("head")
                set_site(family, model, site, nn.Identity())
                state[site] = "identity"
            else:
                affine = ChannelAffine(a.numel()).to(repbn.weight.dtype)
                with torch.no_grad():
                    affine.scale.copy_(a)
                    affine.shift.copy_(b)
                set_site(family, model, site, affine)
                state[site] = "affine"
            continue
        li, _, role = site.partition(":")
        layer = layers[int(li)]
        for key in reader_keys(family, layer, role):
            _fold_reader(family, layer, key, a, b, li, biased)
        set_site(family, model, site, nn.Identity())
        state[site] = "identity"
    return state, biased


def rebuild(family: Family, model: nn.Module, state: dict[str, str], biased: list[str]) -> None:
    """Re-create the shapes of :func:`fold_norms` (or of unfolded RepBNs) from the manifest."""
    dim = family.hidden_size(model.config)
    for site, kind in state.items():
        new = {"identity": nn.Identity, "affine": ChannelAffine, "repbn": RepBN}[kind]
        set_site(family, model, site, new() if kind == "identity" else new(dim))
    layers = family.layers(model)
    for tag in biased:
        if tag == "head":
            set_module(model, family.head, with_bias(family.head_module(model)))
            continue
        i, _, key = tag.partition(":")
        layer = layers[int(i)]
        family.set_linear(layer, key, with_bias(family.linears(layer)[key]))
