"""Compatibility of the models given to ``fuse``, checked before any work.

Every error names the first mismatch and the two models: the family, the architecture (a head
or not, and which), the layer count, the vocabulary (text) or image, channel and patch size
(vision), the number of attention heads and of key/value heads, the number of labels. Widths
(hidden size, MLP width) may differ: the result takes the anchor's. Models already changed by a
structural pass (a dropped sublayer, quantized or factorized linears) are refused: fuse them
before compressing.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family, family_for


def _facts(model: nn.Module, family: Family) -> list[tuple[str, object]]:
    cfg: Any = model.config  # a transformers config: its attributes depend on the model
    facts: list[tuple[str, object]] = [
        ("family", family.name),
        ("architecture", type(model).__name__),
        ("layer count", family.num_layers(model)),
    ]
    if family.modality == "vision":
        channels, size = family.image_shape(cfg)
        facts += [("image size", size), ("channels", channels), ("patch size", family.patch_size(cfg))]
    else:
        facts.append(("vocabulary", family.vocab_size(cfg)))
    facts += [("head count", family.num_heads(cfg)), ("head count (key/value)", family.num_kv_heads(cfg))]
    if getattr(cfg, "num_labels", None) is not None and "Classification" in type(model).__name__:
        facts.append(("label count", int(cfg.num_labels)))
    return facts


def _plain(model: nn.Module, family: Family) -> str | None:
    """Why ``model`` is not a plain dense model of its family, or None."""
    if getattr(model, "is_merged", False):
        return "it is a merged model"
    for i, layer in enumerate(family.layers(model)):
        for which in ("attn", "mlp"):
            if family.is_skipped(layer, which):
                return f"layer {i}'s {which} sublayer was dropped"
        for key, mod in family.linears(layer).items():
            if not family.is_linear(mod):
                return f"layer {i}'s {key} is a {type(mod).__name__}, not a plain linear"
    return None


def check_compatible(models: list[nn.Module], names: list[str] | None = None) -> None:
    """Refuse models fuse cannot combine; the message names the mismatch."""

    def name(i: int) -> str:
        return names[i] if names else f"model {i + 1}"

    if len(models) < 2:
        raise SqueezeError(f"fuse needs at least two models, got {len(models)}")
    families = []
    for i, m in enumerate(models):
        fam = family_for(getattr(m.config, "model_type", None))
        why = _plain(m, fam)
        if why:
            raise SqueezeError(f"fuse: {name(i)} is not a plain {fam.name} model ({why}); fuse before compressing")
        families.append(fam)
    ref = _facts(models[0], families[0])
    for i in range(1, len(models)):
        if families[i].name != families[0].name:
            raise SqueezeError(
                f"fuse: family differs: {name(0)} is {families[0].name}, {name(i)} is {families[i].name}"
            )
        for (what, a), (_, b) in zip(ref, _facts(models[i], families[i]), strict=True):
            if a != b:
                raise SqueezeError(f"fuse: {what} differs: {name(0)} has {a}, {name(i)} has {b}")
