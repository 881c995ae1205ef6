"""Compatibility checks of the ``merge`` pass: can these experts' outputs be averaged?

Checked before anything is written, each error naming the first difference:

* the family, and the kind of output (logits from a head, or hidden states without one);
* what fixes the output's shape and meaning: vocabulary size (text), number and names of
  labels (classifiers), hidden size (headless), image size, channels and patch size (ViT),
  then the output shape itself on a one-sample probe;
* the tokenizer (text): the token -> id map, the special tokens with their ids, and the ids it
  gives a few lines of the built-in corpus (catches different merges or normalisers); for ViT,
  the image processor config (``preprocessor_config.json``). File names never count.

The paper (Growing Transformers, §3.1) also shares one frozen input embedding across experts;
squeeze allows different depths and widths, so it reports whether the embeddings are identical
(ledger metric ``embeddings_identical``) rather than requiring it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family, family_for

log = logging.getLogger(__name__)

# Probe tokens for the output-shape check, and corpus lines for the tokenizer check.
_PROBE_LEN = 4
_SAMPLE_TEXTS = 8
_KIND = {"logits": "logits (it has a head)", "last_hidden_state": "hidden states (no head)"}


def _name(i: int, names: list[str] | None) -> str:
    return names[i] if names else f"model {i + 1}"


def _probe_inputs(model: nn.Module, family: Family) -> dict[str, torch.Tensor]:
    cfg: Any = model.config  # a transformers config: its attributes depend on the model
    if family.modality == "vision":
        channels, size = family.image_shape(cfg)
        return {"pixel_values": torch.zeros(1, channels, size, size)}
    ids = torch.arange(1, _PROBE_LEN + 1).remainder(family.vocab_size(cfg))[None]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in family.model_inputs:
        batch["token_type_ids"] = torch.zeros_like(ids)
    return batch


@torch.no_grad()
def output_signature(model: nn.Module, family: Family) -> tuple[str, tuple[int, ...]]:
    """(what the merge would average, its shape on a one-sample probe)."""
    kwargs: dict[str, Any] = _probe_inputs(model, family)
    if family.causal:
        kwargs["use_cache"] = False
    out = model(**kwargs, return_dict=True)
    logits = getattr(out, "logits", None)
    if logits is not None:
        return "logits", tuple(logits.shape)
    return "last_hidden_state", tuple(out.last_hidden_state.shape)


def _config_facts(model: nn.Module, family: Family, kind: str) -> dict[str, Any]:
    """The config values that fix the output's shape and meaning, by name."""
    cfg: Any = model.config  # a transformers config: its attributes depend on the model
    facts: dict[str, Any] = {}
    if family.modality == "vision":
        channels, facts["image_size"] = family.image_shape(cfg)
        facts["num_channels"] = channels
        if kind == "last_hidden_state":
            facts["patch_size"] = family.patch_size(cfg)
    else:
        facts["vocab_size"] = family.vocab_size(cfg)
    if kind == "last_hidden_state":
        facts["hidden_size"] = family.hidden_size(cfg)
    elif family.modality == "vision" or not family.causal:
        # a classifier's logits are only comparable when the labels mean the same thing
        labels = getattr(cfg, "id2label", None) or {}
        facts["num_labels"] = len(labels)
        facts["id2label"] = {int(k): v for k, v in labels.items()}
    return facts


def check_models(models: list[nn.Module], names: list[str] | None = None) -> tuple[Family, str]:
    """Refuse experts whose family, kind of output or output shape differ.

    Returns the family and what the merge averages (``logits`` or ``last_hidden_state``).
    Raises SqueezeError naming the first difference.
    """
    if len(models) < 2:
        raise SqueezeError(f"merge needs at least two models, got {len(models)}")
    fams = [family_for(getattr(m.config, "model_type", None)) for m in models]
    for i, fam in enumerate(fams[1:], 1):
        if fam.name != fams[0].name:
            raise SqueezeError(
                f"cannot merge: {_name(0, names)} is a {fams[0].name} model, {_name(i, names)} is a {fam.name} model"
            )
    family = fams[0]
    sigs = [output_signature(m, family) for m in models]
    kind = sigs[0][0]
    for i, (k, _) in enumerate(sigs[1:], 1):
        if k != kind:
            raise SqueezeError(
                f"cannot merge: {_name(0, names)} outputs {_KIND[kind]} but {_name(i, names)} outputs {_KIND[k]}"
            )
    facts = [_config_facts(m, family, kind) for m in models]
    for i in range(1, len(models)):
        for key, ref in facts[0].items():
            if facts[i].get(key) == ref:
                continue
            if key == "id2label":
                raise SqueezeError(
                    f"cannot merge: the label names (id2label) of {_name(0, names)} and {_name(i, names)} differ"
                )
            raise SqueezeError(
                f"cannot merge: {key} differs: {_name(0, names)} has {ref}, {_name(i, names)} has {facts[i].get(key)}"
            )
        if sigs[i][1][1:] != sigs[0][1][1:]:
            raise SqueezeError(
                f"cannot merge: output shape differs: {_name(0, names)} gives {kind} of shape {sigs[0][1]}, "
                f"{_name(i, names)} gives {sigs[i][1]}"
            )
    return family, kind


def _tokenizer_facts(tok) -> dict[str, Any]:
    from squeeze.compress.calibration import builtin_corpus

    special: dict[str, Any] = {
        k: (v, tok.convert_tokens_to_ids(v)) for k, v in sorted(tok.special_tokens_map.items()) if isinstance(v, str)
    }
    special["(all special tokens)"] = sorted(tok.all_special_tokens)
    sample = builtin_corpus()[:_SAMPLE_TEXTS]
    return {
        "vocabulary (token -> id map)": tok.get_vocab(),
        "special tokens": special,
        "token ids of sample text": [tok(t, add_special_tokens=True)["input_ids"] for t in sample],
    }


def _processor_config(ckpt) -> dict[str, Any] | None:
    if ckpt.source is None or not (ckpt.source / "preprocessor_config.json").exists():
        return None
    try:
        data = json.loads((ckpt.source / "preprocessor_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SqueezeError(f"{ckpt.source / 'preprocessor_config.json'}: not valid JSON ({exc})") from None
    data.pop("processor_class", None)  # which class reads it says nothing about the pixels
    return data


def check_side_files(ckpts: list, names: list[str], warn: Callable[[str], None] = log.warning) -> None:
    """Refuse checkpoints whose tokenizers (text) or image processors (vision) differ."""
    family = ckpts[0].family
    if family.modality == "vision":
        procs = [_processor_config(c) for c in ckpts]
        for i in range(1, len(ckpts)):
            first, other = procs[0], procs[i]
            if other is None or first is None:
                continue
            diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            if diff:
                raise SqueezeError(
                    f"cannot merge: the image processors of {names[0]} and {names[i]} differ in: {', '.join(diff)}"
                )
        if any(p is None for p in procs):
            warn("an expert has no preprocessor_config.json: image preprocessing was not compared")
        return
    toks = [c.tokenizer() for c in ckpts]
    if all(t is None for t in toks):
        warn("no expert has a tokenizer: only the vocabulary sizes were compared")
        return
    for i, t in enumerate(toks):
        if t is None:
            raise SqueezeError(f"cannot merge: {names[i]} has no tokenizer to compare with {names[0 if i else 1]}'s")
    ref = _tokenizer_facts(toks[0])
    for i in range(1, len(toks)):
        facts = _tokenizer_facts(toks[i])
        for key, value in ref.items():
            if facts[key] != value:
                raise SqueezeError(
                    f"cannot merge: the tokenizers of {names[0]} and {names[i]} differ: {key}{_diff_hint(value, facts[key])}"
                )


def _diff_hint(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted((k for k in set(a) | set(b) if a.get(k) != b.get(k)), key=str)
        if keys:
            k = keys[0]
            return f" (e.g. {k!r}: {a.get(k)!r} vs {b.get(k)!r}; {len(keys)} entries differ)"
    if isinstance(a, list) and isinstance(b, list):
        return f" (first sample: {a[0][:8]}... vs {b[0][:8]}...)" if a and b and a[0] != b[0] else ""
    return ""


def check_compatible(ckpts: list, warn: Callable[[str], None] = log.warning) -> tuple[Family, str]:
    """Every check on loaded checkpoints (models, then tokenizers or image processors).

    Returns the family and what the merge averages; raises SqueezeError on a mismatch.
    """
    names = [str(c.source or c.manifest.base.source or f"model {i + 1}") for i, c in enumerate(ckpts)]
    family, kind = check_models([c.model for c in ckpts], names)
    check_side_files(ckpts, names, warn=warn)
    return family, kind


def embeddings_identical(models: list[nn.Module], family: Family) -> bool:
    """Whether all experts share one input embedding (the paper's shared frozen substrate)."""
    ref = [m.state_dict() for m in family.embedding_modules(models[0])]
    for other in models[1:]:
        for a, b in zip(ref, (m.state_dict() for m in family.embedding_modules(other))):
            if a.keys() != b.keys() or any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a):
                return False
    return True
