"""Model families: the ONLY place in squeeze that knows Hugging Face module names and config keys.

A :class:`Family` says, per ``model_type``, where each *role* lives relative to the base model
(``model.base_model``) or to one transformer layer, owns the operations that differ between
families (skipping a sublayer, splitting and packing a fused qkv, reading a linear's weight in
``(out, in)`` layout whatever the module type: GPT-2's ``Conv1D`` stores it transposed) and the
config facts (vocabulary size, image shape, positions, heads, the layer-count key).

Passes ask for roles (``family.layers(model)``, ``family.role(layer, "attn_out")``) and facts
(``family.vocab_size(config)``), never for names; ``tests/test_layout.py`` greps compress/ and
kernels/ outside this package for Hugging Face module names and config keys.

    family.py   the Family record: roles, per-family operations, config facts
    skip.py     the stand-ins for a dropped sublayer and the per-family skip operations
    table.py    the family table (one entry per architecture), lookup, building a model
    spaces.py   weight spaces: which rows and columns permute together
"""

from squeeze.compress.families.family import Family, image_size
from squeeze.compress.families.skip import PassThroughAttention, PassThroughOutput, Sublayer, ZeroBranch
from squeeze.compress.families.spaces import Axis, Space, SpaceKind, Tap, permute_spaces, random_symmetry, weight_spaces
from squeeze.compress.families.table import (
    BERT,
    DISTILBERT,
    FAMILIES,
    GEMMA,
    GPT2,
    LLAMA,
    MPNET,
    VIT,
    base_class,
    build_from_config,
    family_for,
    model_class,
    supported_model_types,
)

__all__ = [
    "BERT",
    "DISTILBERT",
    "FAMILIES",
    "GEMMA",
    "GPT2",
    "LLAMA",
    "MPNET",
    "VIT",
    "Axis",
    "Family",
    "PassThroughAttention",
    "PassThroughOutput",
    "Space",
    "SpaceKind",
    "Sublayer",
    "Tap",
    "ZeroBranch",
    "base_class",
    "build_from_config",
    "family_for",
    "image_size",
    "model_class",
    "permute_spaces",
    "random_symmetry",
    "supported_model_types",
    "weight_spaces",
]
