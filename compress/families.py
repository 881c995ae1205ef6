"""Model families: the ONLY place in squeeze that knows Hugging Face module names.

A :class:`Family` says, per ``model_type``, where each *role* lives relative to the base model
(``model.base_model``) or to one transformer layer, and owns the operations that differ between
families: skipping a sublayer, splitting and packing a fused qkv, reading a linear's weight in
``(out, in)`` layout whatever the module type (GPT-2's ``Conv1D`` stores it transposed).

Passes ask for roles (``family.layers(model)``, ``family.role(layer, "attn_out")``), never for
names; ``tests/test_layout.py`` greps ``compress/passes/`` for Hugging Face attribute names.

Roles, per layer:
    attn, mlp             the two sublayers (the residual branches)
    attn_norm, mlp_norm   their norms (pre-norm: applied to the branch input;
                          post-norm: applied after the residual add)
    q, k, v, qkv          attention input projections (``qkv`` only where fused)
    attn_out              attention output projection
    mlp_in, mlp_out       MLP projections (``mlp_in`` is a tuple: gate and up for llama)
Roles, per model (relative to the base model): layers, embeddings, final_norm; ``head`` is
relative to the top-level model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
import transformers
from torch import nn

from squeeze.compress import surgery
from squeeze.compress.errors import SqueezeError

log = logging.getLogger(__name__)

Sublayer = Literal["attn", "mlp"]


# --------------------------------------------------------------------------------------------
# Stand-ins for a dropped sublayer. Each makes the residual branch contribute exactly nothing,
# so h_out == h_in bit for bit (x + 0.0 == x in IEEE arithmetic).
# --------------------------------------------------------------------------------------------


class ZeroBranch(nn.Module):
    """A dropped pre-norm sublayer: returns zeros shaped like its input.

    Args:
        returns_tuple: attention modules return ``(output, weights)``; MLPs return a tensor.
    """

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.returns_tuple else zeros


class PassThroughAttention(nn.Module):
    """A dropped post-LN attention block (BERT): the block's output is its input.

    With ``norm`` set, the block keeps its LayerNorm: output = LN(input).
    """

    def __init__(self, norm: nn.Module | None = None):
        super().__init__()
        self.norm = norm

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states if self.norm is None else self.norm(hidden_states)
        return out, None


class PassThroughOutput(nn.Module):
    """A dropped post-LN MLP (BERT ``output`` module): returns the residual input."""

    def __init__(self, norm: nn.Module | None = None):
        super().__init__()
        self.norm = norm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return input_tensor if self.norm is None else self.norm(input_tensor)


_get, _set = surgery.get_module, surgery.set_module


# --------------------------------------------------------------------------------------------
# The family table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """Where things live in one model family, and the operations that differ by family."""

    name: str
    model_types: tuple[str, ...]
    modality: Literal["text", "vision"]
    causal: bool
    default_class: str  # transformers class used when config.architectures names none we know
    classes: tuple[str, ...]  # architectures we accept
    layers_path: str
    roles: dict[str, str | tuple[str, ...] | None]
    norm_kind: Literal["layernorm", "rmsnorm"]
    norm_placement: Literal["pre", "post"]
    embeddings: tuple[str, ...]
    final_norm: str | None
    head: str | None  # relative to the top-level model, when it has one
    conv1d: bool = False  # GPT-2 linears are Conv1D: weight stored (in, out)
    attn_returns_tuple: bool = True
    model_inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    type_classes: tuple[tuple[str, str], ...] = ()  # (model_type, default class) where not default_class
    attention_interface: bool = True  # attention runs through transformers' AttentionInterface
    skip: Callable[[Family, nn.Module, Sublayer, bool], None] | None = field(default=None, repr=False, compare=False)

    # ---------------- structure ----------------

    @property
    def is_decoder(self) -> bool:
        return self.causal

    def base(self, model: nn.Module) -> nn.Module:
        """The base transformer (no head); for squeeze wrappers, the wrapped model's base."""
        return cast(nn.Module, model.base_model)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(self.base(model), self.layers_path)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """Call ``model`` on a batch the way squeeze always does: the model's inputs only (no
        ``labels``), ``return_dict``, and no KV cache for decoders. Returns the model's output."""
        kwargs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
        if self.causal:
            kwargs["use_cache"] = False
        return model(**kwargs, return_dict=True)

    def role_path(self, role: str) -> str | tuple[str, ...] | None:
        if role not in self.roles:
            raise KeyError(f"unknown role {role!r}; roles: {sorted(self.roles)}")
        return self.roles[role]

    def role(self, layer: nn.Module, role: str) -> nn.Module | tuple[nn.Module, ...] | None:
        """The module(s) playing ``role`` inside one transformer layer."""
        path = self.role_path(role)
        if path is None:
            return None
        if isinstance(path, tuple):
            return tuple(_get(layer, p) for p in path)
        return _get(layer, path)

    def set_role(self, layer: nn.Module, role: str, module: nn.Module) -> None:
        path = self.role_path(role)
        if not isinstance(path, str):
            raise KeyError(f"role {role!r} of {self.name} is not a single module")
        _set(layer, path, module)

    def embedding_modules(self, model: nn.Module) -> list[nn.Module]:
        return [_get(self.base(model), p) for p in self.embeddings]

    def final_norm_module(self, model: nn.Module) -> nn.Module | None:
        return None if self.final_norm is None else _get(self.base(model), self.final_norm)

    def head_module(self, model: nn.Module) -> nn.Module | None:
        if self.head is None or not hasattr(model, self.head.split(".")[0]):
            return None
        return _get(model, self.head)

    def linears(self, layer: nn.Module) -> dict[str, nn.Module]:
        """Every linear of one layer by role name (``mlp_in`` expands to ``mlp_in.0`` ...).

        The linears of a skipped (pruned) sublayer no longer exist and are not listed.
        """
        out: dict[str, nn.Module] = {}
        skipped = {w for w in ("attn", "mlp") if self.is_skipped(layer, w)}
        for role in ("q", "k", "v", "qkv", "attn_out", "mlp_in", "mlp_out"):
            if ("mlp" if role.startswith("mlp") else "attn") in skipped:
                continue
            mod = self.role(layer, role)
            if mod is None:
                continue
            if isinstance(mod, tuple):
                out.update({f"{role}.{i}": m for i, m in enumerate(mod)})
            else:
                out[role] = mod
        return out

    # ---------------- weights in (out, in) layout (compress/surgery.py) ----------------

    is_linear = staticmethod(surgery.is_linear)
    linear_weight = staticmethod(surgery.linear_weight)
    set_linear_weight = staticmethod(surgery.set_linear_weight)
    as_linear = staticmethod(surgery.as_linear)

    # ---------------- fused qkv ----------------

    def split_qkv(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """q, k and v of one layer as three ``nn.Linear`` (copies for a fused qkv)."""
        if self.roles.get("qkv") is None:
            return tuple(self.as_linear(self.role(layer, r)) for r in ("q", "k", "v"))
        fused = cast(Any, self.role(layer, "qkv"))  # an nn.Linear or transformers' Conv1D
        w = self.linear_weight(fused)  # (3 * d, d_in)
        b = fused.bias
        parts = []
        for wi, bi in zip(w.chunk(3, dim=0), b.chunk(3) if b is not None else (None,) * 3):
            lin = nn.Linear(wi.shape[1], wi.shape[0], bias=bi is not None, dtype=wi.dtype)
            with torch.no_grad():
                lin.weight.copy_(wi)
                if bi is not None:
                    lin.bias.copy_(bi)
            parts.append(lin)
        return tuple(parts)  # type: ignore[return-value]

    def pack_qkv(self, layer: nn.Module, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> None:
        """Write three (out, in) projections back into the layer (fused or not)."""
        if self.roles.get("qkv") is None:
            for role, lin in zip(("q", "k", "v"), (q, k, v)):
                target = cast(Any, self.role(layer, role))  # an nn.Linear or transformers' Conv1D
                self.set_linear_weight(target, lin.weight)
                if target.bias is not None:
                    with torch.no_grad():
                        target.bias.copy_(lin.bias)
            return
        fused = cast(Any, self.role(layer, "qkv"))
        self.set_linear_weight(fused, torch.cat([q.weight, k.weight, v.weight], dim=0))
        if fused.bias is not None:
            with torch.no_grad():
                fused.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))

    # ---------------- sublayer dropping ----------------

    def skip_sublayer(self, layer: nn.Module, which: Sublayer, keep_norm: bool = False) -> None:
        """Make one sublayer's residual branch contribute nothing: ``h_out = h_in``.

        Pre-norm families lose the branch and its norm. In the post-LN family (BERT) the norm
        sits after the residual add; ``keep_norm`` keeps it (output = LN(h_in)).
        """
        if which not in ("attn", "mlp"):
            raise ValueError(f"sublayer must be 'attn' or 'mlp', got {which!r}")
        assert self.skip is not None
        self.skip(self, layer, which, keep_norm)

    def is_skipped(self, layer: nn.Module, which: Sublayer) -> bool:
        mod = self.role(layer, which)
        mod = mod[-1] if isinstance(mod, tuple) else mod
        return isinstance(mod, (ZeroBranch, PassThroughAttention, PassThroughOutput))

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The attention module of every layer (skipped ones included)."""
        return [cast(nn.Module, self.role(layer, "attn")) for layer in self.layers(model)]

    def renumber_kv_cache(self, model: nn.Module) -> list[int | None]:
        """Give each kept attention layer a dense KV-cache slot (0, 1, ...) after drops.

        Dropped attention layers get no slot, so the cache has no empty slots in the middle
        and ``cache.get_seq_length()`` (slot 0) is always a real layer. Returns the slot of
        every layer (None where attention is dropped).
        """
        slots: list[int | None] = []
        n = 0
        for layer in self.layers(model):
            attn: Any = self.role(layer, "attn")  # a transformers attention module: layer_idx is a plain int
            if self.is_skipped(layer, "attn"):
                slots.append(None)
                continue
            if hasattr(attn, "layer_idx"):
                attn.layer_idx = n
            slots.append(n)
            n += 1
        return slots

    def remove_layers(self, model: nn.Module, drop: list[int]) -> None:
        """Delete whole blocks; the result stays a plain Hugging Face model."""
        layers = self.layers(model)
        keep = [m for i, m in enumerate(layers) if i not in set(drop)]
        _set(self.base(model), self.layers_path, nn.ModuleList(keep))
        cfg: Any = model.config  # a transformers config: its fields depend on the model type
        cfg.num_hidden_layers = len(keep)
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in set(drop)]
        for new_idx, layer in enumerate(keep):
            attn: Any = self.role(layer, "attn")
            if hasattr(attn, "layer_idx"):
                attn.layer_idx = new_idx
            if hasattr(layer, "layer_idx"):
                cast(Any, layer).layer_idx = new_idx

    # ---------------- residual-stream taps and KV-cache slots (used by the prune pass) ----------------

    def residual_tap(self, layer: nn.Module) -> nn.Module:
        """The module whose first input is the residual stream between attention and MLP.

        A forward pre-hook on it sees ``h'``: for pre-norm families the input of the MLP's norm
        (``h + Attn(LN1(h))``), for post-LN BERT the input of the MLP branch (``LN(h +
        Attn(h))``). It stays in place after either sublayer is skipped (a skipped pre-norm MLP
        keeps an ``nn.Identity`` where its norm was; a skipped BERT MLP an ``nn.Identity``
        intermediate), so partially pruned models can be re-scored.
        """
        if self.norm_placement == "pre":
            return cast(nn.Module, self.role(layer, "mlp_norm"))
        mlp = self.role(layer, "mlp")
        return cast(nn.Module, mlp[0] if isinstance(mlp, tuple) else mlp)

    def compact_kv_cache(self, model: nn.Module) -> list[int | None]:
        """:meth:`renumber_kv_cache`, then make every KV cache the model uses hold exactly one
        slot per kept attention layer.

        transformers builds its caches from the config (``DynamicCache(config=...)`` in the
        model's forward and in ``generate``; ``StaticCache`` likewise) with one slot per
        ``num_hidden_layers``, typed per original layer (full or sliding attention). After
        renumbering, slots ``n_kept..L-1`` would stay empty forever (``cache.is_initialized``
        never turns true, ``len(cache)`` is wrong, a static cache could pre-allocate them) and
        slot ``s`` would carry the type of original layer ``s`` rather than of the layer now
        using it. A forward pre-hook on the base model (installed once; it survives deepcopy)
        therefore rebuilds a config-shaped cache as the kept layers' own slots, in order, and
        creates that cache itself when the model would otherwise build one. Caches that
        already have ``n_kept`` slots, or that grow lazily (``DynamicCache()``), are left alone.
        Nothing is installed when no attention layer is skipped.
        """
        slots = self.renumber_kv_cache(model)
        kept = [i for i, s in enumerate(slots) if s is not None]
        base = self.base(model)
        cast(Any, base)._squeeze_kv_kept = (tuple(kept), len(slots))  # a plain attribute, read by the hook
        if len(kept) < len(slots) and not any(h is _compact_cache_hook for h in base._forward_pre_hooks.values()):
            base.register_forward_pre_hook(_compact_cache_hook, with_kwargs=True)
        return slots

    # ---------------- quantization hooks (used by the quantize pass) ----------------

    def set_linear(self, layer: nn.Module, key: str, module: nn.Module) -> None:
        """Replace one linear of a layer; ``key`` as in :meth:`linears` (``q``, ``mlp_in.0``)."""
        role, _, idx = key.partition(".")
        path = self.role_path(role)
        if isinstance(path, tuple):
            path = path[int(idx or 0)]
        if not path:
            raise KeyError(f"{self.name} has no linear {key!r}")
        _set(layer, path, module)

    def attention_core(self, layer: nn.Module) -> nn.Module:
        """The module transformers' attention function receives: the owner of q/k/v (or qkv)."""
        path = cast(str, self.role_path("q") or self.role_path("qkv"))  # q and qkv are single modules
        return _get(layer, path.rpartition(".")[0])

    def input_norm(self, layer: nn.Module, sublayer: Sublayer) -> nn.Module | None:
        """The norm whose output feeds only this sublayer's input linears (pre-norm families),
        or None where the norm's output also feeds the residual stream (post-LN BERT)."""
        if self.norm_placement != "pre":
            return None
        return cast(nn.Module, self.role(layer, "attn_norm" if sublayer == "attn" else "mlp_norm"))

    def embedding_tables(self, model: nn.Module) -> list[tuple[str, nn.Embedding]]:
        """Every ``nn.Embedding`` of the embeddings as ``(key, module)``, except a table tied to
        the head (quantizing it would untie the LM head)."""
        head = self.head_module(model)
        tied = getattr(head, "weight", None) if head is not None else None
        out = []
        for i, mod in enumerate(self.embedding_modules(model)):
            for sub, m in mod.named_modules():
                if isinstance(m, nn.Embedding) and (tied is None or m.weight is not tied):
                    out.append((f"{i}:{sub}", m))
        return out

    def set_embedding_table(self, model: nn.Module, key: str, module: nn.Module) -> None:
        i, _, sub = key.partition(":")
        _set(self.base(model), self.embeddings[int(i)] + (f".{sub}" if sub else ""), module)

    @staticmethod
    def use_attention_function(model: nn.Module, name: str, fn: Callable) -> None:
        """Route every attention layer through ``fn`` (transformers' AttentionInterface), with
        eager-style additive float masks."""
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, eager_mask)
        cast(Any, model).set_attn_implementation(name)  # a transformers PreTrainedModel

    @staticmethod
    def num_kv_heads(config) -> int:
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)

    # ---------------- config facts ----------------

    @staticmethod
    def hidden_size(config) -> int:
        return int(config.hidden_size)

    @staticmethod
    def num_heads(config) -> int:
        return int(config.num_attention_heads)


def _compact_cache_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of :meth:`Family.compact_kv_cache` on a decoder's base model."""
    kept, total = getattr(module, "_squeeze_kv_kept", ((), 0))
    if len(kept) == total:
        return None
    from transformers.cache_utils import Cache, DynamicCache

    key = "past_key_values" if "past_key_values" in kwargs else "cache"
    cache = kwargs.get(key)
    if cache is None:
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(module.config, "use_cache", False))
        if not use_cache or module.training:
            return None
        cache = DynamicCache(
            config=cast(transformers.PretrainedConfig, module.config)
        )  # what the model would build itself
        kwargs[key] = cache
    if isinstance(cache, Cache) and len(cache.layers) == total:
        cache.layers = [cache.layers[i] for i in kept]
    return args, kwargs


def _skip_pre_norm(fam: Family, layer: nn.Module, which: Sublayer, keep_norm: bool) -> None:
    if keep_norm:
        raise SqueezeError(f"{fam.name} is a pre-norm family: a dropped sublayer takes its norm with it")
    norm_role = "attn_norm" if which == "attn" else "mlp_norm"
    fam.set_role(layer, norm_role, nn.Identity())
    fam.set_role(layer, which, ZeroBranch(returns_tuple=(which == "attn" and fam.attn_returns_tuple)))


def _skip_bert(fam: Family, layer: nn.Module, which: Sublayer, keep_norm: bool) -> None:
    # BERT: attention = self-attention + output(dense, LayerNorm(x + h)); mlp = intermediate +
    # output(dense, LayerNorm(x + h)). Skipping replaces the whole block, LN optionally kept.
    if which == "attn":
        norm = cast(nn.Module, fam.role(layer, "attn_norm")) if keep_norm else None
        layer.attention = PassThroughAttention(norm)
    else:
        norm = cast(nn.Module, fam.role(layer, "mlp_norm")) if keep_norm else None
        layer.intermediate = nn.Identity()
        layer.output = PassThroughOutput(norm)


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
    skip=_skip_bert,
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
    skip=_skip_pre_norm,
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
    skip=_skip_pre_norm,
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
    skip=_skip_pre_norm,
)


def _skip_post_zero(fam: Family, layer: nn.Module, which: Sublayer, keep_norm: bool) -> None:
    # DistilBERT: norm(branch(x) + x) with the branch a module of its own: the branch returns
    # zeros and its norm becomes an identity (kept with keep_norm: output = LN(x)).
    if not keep_norm:
        fam.set_role(layer, "attn_norm" if which == "attn" else "mlp_norm", nn.Identity())
    fam.set_role(layer, which, ZeroBranch(returns_tuple=(which == "attn")))


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
    skip=_skip_bert,  # the same attention / intermediate / output attributes as BERT
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
    skip=_skip_post_zero,
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
    skip=_skip_pre_norm,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (BERT, VIT, LLAMA, GPT2, MPNET, DISTILBERT, GEMMA)}
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


def build_from_config(family: Family, config) -> nn.Module:
    """An architecture with freshly initialised weights (to be overwritten by a state dict)."""
    cls = model_class(family, config)
    model = cls._from_config(config)  # type: ignore[attr-defined]  # a transformers PreTrainedModel class
    model.eval()
    return model


def image_size(config) -> int:
    size = config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


# --- weight spaces ---
# Which rows and columns of a model's stored tensors permute together (as mergekit's architecture
# files and git re-basin's permutation specs record them). A *space* is a set of tensor axes that
# index the same neurons: permuting all of them by one (structured) permutation leaves the model's
# function unchanged. Per model: the residual stream (``residual``); per layer i: the attention
# query/key space (``layers.i.qk``, Q and K rows share one head-structured permutation), the
# value/output space (``layers.i.vo``, V rows and W_O columns, same head permutation as Q/K) and
# the MLP hidden (``layers.i.mlp``). Fusion (passes/fuse) and folding passes read these; only
# this section knows the Hugging Face names behind them.

SpaceKind = Literal["residual", "qk", "vo", "mlp"]


@dataclass(frozen=True)
class Axis:
    """One axis of one stored tensor that lives in a space.

    ``param`` is the state-dict key from the top-level model and ``dim`` the axis in the *stored*
    layout (GPT-2's Conv1D keeps weights as (in, out)). ``io`` says what the tensor is to the
    space: ``"out"`` for a per-neuron parameter (produced rows, their bias, a norm's weight and
    bias, an embedding's hidden columns) and ``"in"`` for a reader (input columns). ``part`` names
    the producer or reader (embed, norm, q, k, v, o, mlp_in, mlp_out, head); ``start:stop`` is the
    slice of a fused tensor (GPT-2's c_attn). Residual axes carry the ``stage`` of the stream they
    touch: 0 is the embeddings' output, 2i+1 the stream after layer i's attention, 2i+2 after its
    MLP (a pre-norm layer i reads stage 2i).
    """

    param: str
    dim: int
    io: Literal["in", "out"]
    part: str
    start: int = 0
    stop: int | None = None
    stage: int | None = None


@dataclass(frozen=True)
class Tap:
    """Where a space's activations can be read: a module's first input or its output (last
    dimension sliced ``start:stop`` for fused projections); ``module`` from the top-level model."""

    module: str
    what: Literal["input", "output"] = "output"
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class Space:
    """A set of axes permuting together, the taps that read its activations, and its structure.

    ``sizes`` gives each part's width (qk: q and k differ under GQA; vo: v and o). Taps: residual
    ``embed`` (stage 0), ``attn.i`` and ``mlp.i`` (the branch outputs written at stages 2i+1 and
    2i+2) and ``stream.s`` (the stream at stage s); qk ``q`` and ``k``; vo ``v``; mlp ``hidden``
    (the input of the MLP's output projection, after the activation and gating).
    """

    name: str
    kind: SpaceKind
    layer: int | None
    axes: tuple[Axis, ...]
    taps: dict[str, Tap]
    sizes: dict[str, int]
    heads: int = 1
    kv_heads: int = 1
    rope: bool = False  # rotary positions: Q/K dimensions may not permute within a head

    @property
    def head_dim(self) -> int:
        return self.sizes["q"] // self.heads if self.kind == "qk" else self.sizes.get("v", 0) // max(self.kv_heads, 1)


# Per family, the embedding axes (from the base model: key, dim, part) and the readers of the
# final stream besides ``Family.head`` (from the base model). Keys absent from a model are skipped.
_EMBED_AXES: dict[str, tuple[tuple[str, int, str], ...]] = {
    "bert": (
        ("embeddings.word_embeddings.weight", 1, "embed"),
        ("embeddings.position_embeddings.weight", 1, "embed"),
        ("embeddings.token_type_embeddings.weight", 1, "embed"),
        ("embeddings.LayerNorm.weight", 0, "norm"),
        ("embeddings.LayerNorm.bias", 0, "norm"),
    ),
    "vit": (
        ("embeddings.cls_token", 2, "embed"),
        ("embeddings.distillation_token", 2, "embed"),
        ("embeddings.position_embeddings", 2, "embed"),
        ("embeddings.patch_embeddings.projection.weight", 0, "embed"),
        ("embeddings.patch_embeddings.projection.bias", 0, "embed"),
    ),
    "llama": (("embed_tokens.weight", 1, "embed"),),
    "gpt2": (("wte.weight", 1, "embed"), ("wpe.weight", 1, "embed")),
    "distilbert": (
        ("embeddings.word_embeddings.weight", 1, "embed"),
        ("embeddings.position_embeddings.weight", 1, "embed"),
        ("embeddings.LayerNorm.weight", 0, "norm"),
        ("embeddings.LayerNorm.bias", 0, "norm"),
    ),
}
_FINAL_READERS: dict[str, tuple[str, ...]] = {
    "bert": ("pooler.dense",),
    "vit": ("pooler.dense",),
    "llama": (),
    "gpt2": (),
    "distilbert": (),
}


def _prefix_of(model: nn.Module, sub: nn.Module) -> str:
    name = next((n for n, m in model.named_modules() if m is sub), None)
    if name is None:
        raise KeyError("module not found in model")
    return f"{name}." if name else ""


def weight_spaces(family: Family, model: nn.Module) -> list[Space]:
    """Every weight space of ``model``: the residual stream first, then per layer qk, vo, mlp.

    A tied head (GPT-2's lm_head is wte) is listed once, as the embedding it is.
    """
    if family.name not in _EMBED_AXES:  # gemma (rotary, (1 + w) norms) and mpnet (per-head position bias): not yet
        raise SqueezeError(
            f"the weight spaces of {family.name} models are not described; supported: {', '.join(_EMBED_AXES)}"
        )
    cfg = model.config
    base = _prefix_of(model, family.base(model))
    params = dict(model.named_parameters(remove_duplicate=False))
    state = model.state_dict()
    d = family.hidden_size(cfg)
    heads, kv = family.num_heads(cfg), family.num_kv_heads(cfg)
    hd = int(getattr(cfg, "head_dim", None) or d // heads)
    ci, co = (0, 1) if family.conv1d else (1, 0)  # stored (in, out) for Conv1D, (out, in) for Linear
    resid: list[Axis] = []

    def linear(
        path: str, io: Literal["in", "out"], part: str, space_dim: str, stage=None, start=0, stop=None
    ) -> list[Axis]:
        dim = ci if space_dim == "in" else co
        out = [Axis(f"{path}.weight", dim, io, part, start, stop, stage)]
        if space_dim == "out" and f"{path}.bias" in state:
            out.append(Axis(f"{path}.bias", 0, io, part, start, stop, stage))
        return out

    def norm(path: str, stage: int) -> list[Axis]:
        return [
            Axis(f"{path}.{n}", 0, "out", "norm", stage=stage) for n in ("weight", "bias") if f"{path}.{n}" in state
        ]

    for key, dim, part in _EMBED_AXES[family.name]:
        if base + key in state:
            resid.append(Axis(base + key, dim, "out", part, stage=0))
    taps: dict[str, Tap] = {}
    spaces: list[Space] = []
    n_layers = family.num_layers(model)
    for i in range(n_layers):
        lp = f"{base}{family.layers_path}.{i}."
        # str paths, a tuple for mlp_in, None for a role the family lacks (qkv or q/k/v)
        r: dict[str, Any] = {role: family.role_path(role) for role in family.roles}
        s_in, s_mid, s_out = 2 * i, 2 * i + 1, 2 * i + 2
        if r["qkv"] is not None:
            qkv = lp + r["qkv"]
            q_ax = linear(qkv, "out", "q", "out", start=0, stop=d)
            k_ax = linear(qkv, "out", "k", "out", start=d, stop=2 * d)
            v_ax = linear(qkv, "out", "v", "out", start=2 * d, stop=3 * d)
            resid += linear(qkv, "in", "q", "in", stage=s_in)
            q_tap, k_tap, v_tap = Tap(qkv, stop=d), Tap(qkv, start=d, stop=2 * d), Tap(qkv, start=2 * d, stop=3 * d)
        else:
            q_ax, k_ax, v_ax = (linear(lp + r[p], "out", p, "out") for p in ("q", "k", "v"))
            for p in ("q", "k", "v"):
                resid += linear(lp + r[p], "in", p, "in", stage=s_in)
            q_tap, k_tap, v_tap = (Tap(lp + r[p]) for p in ("q", "k", "v"))
        o = lp + r["attn_out"]
        resid += linear(o, "out", "o", "out", stage=s_mid)
        mlp_in = [lp + p for p in r["mlp_in"]]
        for p in mlp_in:
            resid += linear(p, "in", "mlp_in", "in", stage=s_mid)
        down = lp + r["mlp_out"]
        resid += linear(down, "out", "mlp_out", "out", stage=s_out)
        if family.norm_placement == "pre":
            resid += norm(lp + r["attn_norm"], s_in) + norm(lp + r["mlp_norm"], s_mid)
            taps[f"stream.{s_in}"] = Tap(lp + r["attn_norm"], "input")
            taps[f"stream.{s_mid}"] = Tap(lp + r["mlp_norm"], "input")
        else:  # post-LN: each norm produces the stream after its residual add
            resid += norm(lp + r["attn_norm"], s_mid) + norm(lp + r["mlp_norm"], s_out)
            taps[f"stream.{s_mid}"] = Tap(lp + r["attn_norm"])
            taps[f"stream.{s_out}"] = Tap(lp + r["mlp_norm"])
        taps[f"attn.{i}"] = Tap(o)
        taps[f"mlp.{i}"] = Tap(down)
        spaces.append(
            Space(
                f"layers.{i}.qk",
                "qk",
                i,
                tuple(q_ax + k_ax),
                {"q": q_tap, "k": k_tap},
                {"q": heads * hd, "k": kv * hd},
                heads,
                kv,
                rope=family.name == "llama",
            )
        )
        spaces.append(
            Space(
                f"layers.{i}.vo",
                "vo",
                i,
                tuple(v_ax + linear(o, "in", "o", "in")),
                {"v": v_tap},
                {"v": kv * hd, "o": heads * hd},
                heads,
                kv,
            )
        )
        width = family.linear_weight(model.get_submodule(down)).shape[1]
        mlp_ax = [a for p in mlp_in for a in linear(p, "out", "mlp_in", "out")] + linear(down, "in", "mlp_out", "in")
        spaces.append(
            Space(
                f"layers.{i}.mlp",
                "mlp",
                i,
                tuple(mlp_ax),
                {"hidden": Tap(down, "input")},
                {"mlp_in": width, "mlp_out": width},
            )
        )
    last = 2 * n_layers
    if family.final_norm is not None:
        resid += norm(base + family.final_norm, last)
        taps[f"stream.{last}"] = Tap(base + family.final_norm, "input")
    if family.norm_placement == "post":  # the embeddings end in their own norm: their output is stage 0
        taps["stream.0"] = Tap(base + family.embeddings[0])
    taps["embed"] = taps["stream.0"]
    readers = [base + p for p in _FINAL_READERS[family.name]]
    head = family.head_module(model)
    if head is not None and not any(head.weight is p for k, p in params.items() if k.startswith(base)):
        readers.append(cast(str, family.head))  # an untied head; a tied one is the embedding already listed
    for path in readers:
        if f"{path}.weight" in state:
            resid += linear(path, "in", "head", "in", stage=last)
    return [Space("residual", "residual", None, tuple(resid), taps, {"all": d}), *spaces]


def random_symmetry(spaces: list[Space], generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """A random function-preserving permutation of every space, as gather indices per part.

    ``perm[space.name][part]`` (or ``["all"]``) indexes the old neurons for each new slot. Heads
    permute as blocks, shared by Q, K, V and W_O (GQA: key/value groups permute, query heads
    permute inside their group); dimensions permute within a head, shared by Q and K (a rotary
    model only permutes whole (j, j + d/2) pairs) and separately for V and W_O.
    """

    def rand(n: int) -> torch.Tensor:
        return torch.randperm(n, generator=generator)

    out: dict[str, dict[str, torch.Tensor]] = {}
    by_layer: dict[int, dict[str, Space]] = {}
    for s in spaces:
        if s.kind in ("residual", "mlp"):
            out[s.name] = {"all": rand(next(iter(s.sizes.values())))}
        else:
            by_layer.setdefault(cast(int, s.layer), {})[s.kind] = s  # qk / vo spaces belong to a layer
    for pair in by_layer.values():
        qk, vo = pair["qk"], pair["vo"]
        h, g = qk.heads, qk.kv_heads
        r, dq, dv = h // g, qk.head_dim, vo.head_dim
        groups = rand(g)  # new group slot -> old group
        within = [rand(r) for _ in range(g)]  # per new group slot: new head slot -> old head in group
        # per old group; under rotary positions each (j, j + d/2) pair turns at its own frequency,
        # so no within-head permutation of Q/K preserves the scores
        qk_dims = [torch.arange(dq) if qk.rope else rand(dq) for _ in range(g)]
        v_dims = [rand(dv) for _ in range(g)]
        q_idx, k_idx, v_idx, o_idx = [], [], [], []
        for new_g in range(g):
            old_g = int(groups[new_g])
            k_idx.append(old_g * dq + qk_dims[old_g])
            v_idx.append(old_g * dv + v_dims[old_g])
            for t in range(r):
                old_h = old_g * r + int(within[new_g][t])
                q_idx.append(old_h * dq + qk_dims[old_g])
                o_idx.append(old_h * dv + v_dims[old_g])
        out[qk.name] = {"q": torch.cat(q_idx), "k": torch.cat(k_idx)}
        out[vo.name] = {"v": torch.cat(v_idx), "o": torch.cat(o_idx)}
    return out


def permute_spaces(state: dict[str, torch.Tensor], spaces: list[Space], perm: dict[str, dict[str, torch.Tensor]]):
    """A new state dict with every space permuted by ``perm`` (gather indices, as from
    :func:`random_symmetry`); tensors no space touches are shared with ``state``."""
    out = dict(state)
    alias = {
        k: [j for j, u in state.items() if j != k and u.data_ptr() == t.data_ptr() and u.shape == t.shape]
        for k, t in state.items()
    }  # tied tensors (GPT-2's lm_head is wte) move together
    for s in spaces:
        for ax in s.axes:
            idx = cast(torch.Tensor, perm[s.name].get(ax.part, perm[s.name].get("all")))
            t = out[ax.param]
            stop = t.shape[ax.dim] if ax.stop is None else ax.stop
            part = t.narrow(ax.dim, ax.start, stop - ax.start).index_select(ax.dim, idx)
            out[ax.param] = torch.cat(
                [t.narrow(ax.dim, 0, ax.start), part, t.narrow(ax.dim, stop, t.shape[ax.dim] - stop)], dim=ax.dim
            )
            for other in alias[ax.param]:
                out[other] = out[ax.param]
    return out
