"""The family table: one :class:`Family` per architecture squeeze supports, the lookup by
``model_type``, and building a transformers model of a family from its config.

A new family is one entry here (plus, for fusion, its weight spaces in ``spaces.py``).
"""

from __future__ import annotations

import transformers
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families.family import Family
from squeeze.compress.families.skip import skip_bert, skip_post_zero, skip_pre_norm

BERT = Family(
    name="bert",
    model_types=("bert", "roberta", "xlm-roberta"),  # RoBERTa / XLM-R: BERT's layers, own embeddings
    modality="text",
    causal=False,
    default_class="BertModel",
    classes=(
        "BertModel",
        "BertForSequenceClassification",
        "BertForMaskedLM",
        "BertForTokenClassification",
        "RobertaModel",
        "RobertaForMaskedLM",
        "RobertaForSequenceClassification",
        "XLMRobertaModel",
        "XLMRobertaForMaskedLM",
        "XLMRobertaForSequenceClassification",
    ),
    type_classes=(("roberta", "RobertaModel"), ("xlm-roberta", "XLMRobertaModel")),
    layers_path="encoder.layer",
    roles={
        "attn": "attention",
        "mlp": ("intermediate", "output"),
        "attn_norm": "attention.output.LayerNorm",
        "mlp_norm": "output.LayerNorm",
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "qkv": None,
        "attn_out": "attention.output.dense",
        "mlp_in": ("intermediate.dense",),
        "mlp_out": "output.dense",
    },
    norm_kind="layernorm",
    norm_placement="post",
    embeddings=("embeddings",),
    final_norm=None,
    head=None,
    model_inputs=("input_ids", "attention_mask", "token_type_ids"),
    skip=skip_bert,
)

VIT = Family(
    name="vit",
    model_types=("vit", "deit"),
    modality="vision",
    causal=False,
    default_class="ViTModel",
    classes=("ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification"),
    layers_path="layers",
    roles={
        "attn": "attention",
        "mlp": "mlp",
        "attn_norm": "layernorm_before",
        "mlp_norm": "layernorm_after",
        "q": "attention.q_proj",
        "k": "attention.k_proj",
        "v": "attention.v_proj",
        "qkv": None,
        "attn_out": "attention.o_proj",
        "mlp_in": ("mlp.fc1",),
        "mlp_out": "mlp.fc2",
    },
    norm_kind="layernorm",
    norm_placement="pre",
    embeddings=("embeddings",),
    final_norm="layernorm",
    head="classifier",
    model_inputs=("pixel_values",),
    skip=skip_pre_norm,
)

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    modality="text",
    causal=True,
    default_class="LlamaForCausalLM",
    classes=("LlamaForCausalLM", "LlamaModel", "MistralForCausalLM", "MistralModel", "Qwen2ForCausalLM", "Qwen2Model"),
    layers_path="layers",
    roles={
        "attn": "self_attn",
        "mlp": "mlp",
        "attn_norm": "input_layernorm",
        "mlp_norm": "post_attention_layernorm",
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "qkv": None,
        "attn_out": "self_attn.o_proj",
        "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp_out": "mlp.down_proj",
    },
    norm_kind="rmsnorm",
    norm_placement="pre",
    embeddings=("embed_tokens",),
    final_norm="norm",
    head="lm_head",
    skip=skip_pre_norm,
)

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    modality="text",
    causal=True,
    default_class="GPT2LMHeadModel",
    classes=("GPT2LMHeadModel", "GPT2Model"),
    layers_path="h",
    roles={
        "attn": "attn",
        "mlp": "mlp",
        "attn_norm": "ln_1",
        "mlp_norm": "ln_2",
        "q": None,
        "k": None,
        "v": None,
        "qkv": "attn.c_attn",
        "attn_out": "attn.c_proj",
        "mlp_in": ("mlp.c_fc",),
        "mlp_out": "mlp.c_proj",
    },
    norm_kind="layernorm",
    norm_placement="pre",
    embeddings=("wte", "wpe"),
    final_norm="ln_f",
    head="lm_head",
    conv1d=True,
    skip=skip_pre_norm,
)


MPNET = Family(  # BERT's post-LN layer with q/k/v/o one level down; a relative position bias per head
    name="mpnet",
    model_types=("mpnet",),
    modality="text",
    causal=False,
    default_class="MPNetModel",
    classes=("MPNetModel", "MPNetForMaskedLM", "MPNetForSequenceClassification"),
    layers_path="encoder.layer",
    roles={
        "attn": "attention",
        "mlp": ("intermediate", "output"),
        "attn_norm": "attention.LayerNorm",
        "mlp_norm": "output.LayerNorm",
        "q": "attention.attn.q",
        "k": "attention.attn.k",
        "v": "attention.attn.v",
        "qkv": None,
        "attn_out": "attention.attn.o",
        "mlp_in": ("intermediate.dense",),
        "mlp_out": "output.dense",
    },
    norm_kind="layernorm",
    norm_placement="post",
    embeddings=("embeddings",),
    final_norm=None,
    head=None,
    attention_interface=False,  # MPNetSelfAttention computes its scores itself
    skip=skip_bert,  # the same attention / intermediate / output attributes as BERT
    layer_returns_tuple=True,
)

DISTILBERT = Family(
    name="distilbert",
    model_types=("distilbert",),
    modality="text",
    causal=False,
    default_class="DistilBertModel",
    classes=("DistilBertModel", "DistilBertForMaskedLM", "DistilBertForSequenceClassification"),
    layers_path="transformer.layer",
    roles={
        "attn": "attention",
        "mlp": "ffn",
        "attn_norm": "sa_layer_norm",
        "mlp_norm": "output_layer_norm",
        "q": "attention.q_lin",
        "k": "attention.k_lin",
        "v": "attention.v_lin",
        "qkv": None,
        "attn_out": "attention.out_lin",
        "mlp_in": ("ffn.lin1",),
        "mlp_out": "ffn.lin2",
    },
    norm_kind="layernorm",
    norm_placement="post",
    embeddings=("embeddings",),
    final_norm=None,
    head=None,
    skip=skip_post_zero,
)

GEMMA = Family(  # llama's roles; RMSNorm scales by (1 + weight) and the embeddings by sqrt(hidden)
    name="gemma",
    model_types=("gemma",),
    modality="text",
    causal=True,
    default_class="GemmaForCausalLM",
    classes=("GemmaForCausalLM", "GemmaModel"),
    layers_path="layers",
    roles=dict(LLAMA.roles),
    norm_kind="rmsnorm",
    norm_placement="pre",
    embeddings=("embed_tokens",),
    final_norm="norm",
    head="lm_head",
    skip=skip_pre_norm,
)

PHI3 = Family(  # llama's layer with fused projections: qkv_proj (q, k, v rows) and gate_up_proj (gate, up rows)
    name="phi3",
    model_types=("phi3",),
    modality="text",
    causal=True,
    default_class="Phi3ForCausalLM",
    classes=("Phi3ForCausalLM", "Phi3Model"),
    layers_path="layers",
    roles={
        "attn": "self_attn",
        "mlp": "mlp",
        "attn_norm": "input_layernorm",
        "mlp_norm": "post_attention_layernorm",
        "q": None,
        "k": None,
        "v": None,
        "qkv": "self_attn.qkv_proj",
        "attn_out": "self_attn.o_proj",
        "mlp_in": ("mlp.gate_up_proj",),
        "mlp_out": "mlp.down_proj",
    },
    norm_kind="rmsnorm",
    norm_placement="pre",
    embeddings=("embed_tokens",),
    final_norm="norm",
    head="lm_head",
    skip=skip_pre_norm,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (BERT, VIT, LLAMA, GPT2, MPNET, DISTILBERT, GEMMA, PHI3)}
_BY_MODEL_TYPE: dict[str, Family] = {mt: f for f in FAMILIES.values() for mt in f.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_for(model_type: str | None) -> Family:
    """The family of a ``model_type``; a clear error listing the supported ones otherwise."""
    fam = _BY_MODEL_TYPE.get(model_type or "")
    if fam is None:
        raise SqueezeError(
            f"unsupported model_type {model_type!r}; squeeze supports: {', '.join(supported_model_types())}"
        )
    return fam


def model_class(family: Family, config) -> type:
    """The transformers class to build for a config: its own architecture when we know it."""
    archs = list(getattr(config, "architectures", None) or [])
    default = dict(family.type_classes).get(getattr(config, "model_type", ""), family.default_class)
    name = next((a for a in archs if a in family.classes), default)
    return getattr(transformers, name)


def base_class(family: Family, config) -> type:
    """The family's class for this config's model_type whatever ``architectures`` says (MPNetModel
    for a sentence-transformers folder whose config names MPNetForMaskedLM but holds no head)."""
    return getattr(transformers, dict(family.type_classes).get(getattr(config, "model_type", ""), family.default_class))


def build_from_config(family: Family, config) -> nn.Module:
    """An architecture with freshly initialised weights (to be overwritten by a state dict)."""
    cls = model_class(family, config)
    model = cls._from_config(config)  # type: ignore[attr-defined]  # a transformers PreTrainedModel class
    model.eval()
    return model
