"""Plain or refused: what config.json says in a folder squeeze writes.

A folder whose model is still a plain Hugging Face model (the same state-dict keys and shapes as
the architecture its config builds, and only transformers / torch modules: whole-block drops,
distillation, fusion) gets the model's own config, and transformers and sentence-transformers
load it correctly without squeeze.

Any other folder (dropped sublayers, integer weights, merged experts, factorized linears) would
load *silently wrong* elsewhere: transformers fills the keys it cannot find with random weights.
Its config.json therefore names a ``model_type`` no library knows, which spells out what the
folder is and how to load it, so ``AutoConfig``, ``AutoModel*`` and ``SentenceTransformer``
refuse it with that text in their error. The original ``model_type`` is kept beside it
(``squeeze_model_type``) and squeeze itself rebuilds the model from ``squeeze.json``, never from
config.json. (A concrete class called directly, e.g. ``LlamaForCausalLM.from_pretrained``,
reads any config; transformers then only warns that the model types differ.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: the model_type of a folder only squeeze can load (transformers quotes it in its error)
REFUSED_MODEL_TYPE = "squeeze-compressed, not plain transformers: load it with squeeze.compress.load(folder)"
#: config.json key keeping the real model_type of a refused folder
ORIGINAL_KEY = "squeeze_model_type"


def _foreign_module(model: nn.Module) -> str | None:
    for name, mod in model.named_modules():
        where = type(mod).__module__
        if not where.startswith(("transformers.", "torch.")):
            return f"{name or 'model'} is a {type(mod).__name__}"
    return None


def plain_reason(model: nn.Module, family) -> str | None:
    """None when ``model`` is exactly what its config builds in transformers; else why not."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return f"a {type(model).__name__} wrapping other models"
    foreign = _foreign_module(model)
    if foreign is not None:
        return foreign
    from squeeze.compress.families import model_class

    try:
        with torch.device("meta"):
            plain = model_class(family, config)._from_config(config)
    except Exception as exc:  # a config transformers cannot build is not plain
        return f"its config does not build ({type(exc).__name__})"
    want = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        return f"its weights differ from the architecture's (e.g. {diff[0]})"
    return None


def config_dict(model: nn.Module, family, base_config: dict[str, Any]) -> dict[str, Any]:
    """What config.json holds for ``model``: its own config when plain, else a refused one."""
    config: Any = getattr(model, "config", None)  # a transformers config whenever plain_reason is None
    reason = plain_reason(model, family)
    if reason is None:
        return json.loads(config.to_json_string())
    data = json.loads(config.to_json_string()) if hasattr(config, "to_json_string") else dict(base_config)
    original = data.get("model_type") or base_config.get("model_type")
    data.update({"model_type": REFUSED_MODEL_TYPE, ORIGINAL_KEY: original, "squeeze_not_plain": reason})
    data.pop("architectures", None)
    return data


def write_config(model: nn.Module, family, base_config: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(config_dict(model, family, base_config), indent=2, sort_keys=True) + "\n")


def is_refused(folder: Path) -> bool:
    """Whether a folder's config.json is a refused one (written for squeeze alone)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == REFUSED_MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False
