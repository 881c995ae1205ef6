"""The :class:`Family` record: where each role lives in one model family, the operations that
differ by family, and the config facts (what a transformers config calls the vocabulary size,
the image shape, the positions, the heads, the layer count).

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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast

import torch
from torch import nn

from squeeze.compress import surgery
from squeeze.compress.families.skip import STAND_INS, Sublayer

_get, _set = surgery.get_module, surgery.set_module


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
    layer_returns_tuple: bool = False  # a layer returns (hidden, ...), its encoder takes [0] (mpnet)
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
        w = self.linear_weight(fused)  # (q + 2 * kv rows, d_in)
        b = fused.bias
        sizes = self._qkv_rows(layer, w.shape[0])
        parts = []
        for wi, bi in zip(w.split(sizes, dim=0), b.split(sizes) if b is not None else (None,) * 3):
            lin = nn.Linear(wi.shape[1], wi.shape[0], bias=bi is not None, dtype=wi.dtype)
            with torch.no_grad():
                lin.weight.copy_(wi)
                if bi is not None:
                    lin.bias.copy_(bi)
            parts.append(lin)
        return tuple(parts)  # type: ignore[return-value]

    def _qkv_rows(self, layer: nn.Module, rows: int) -> list[int]:
        """Rows of q, k and v in a fused projection: thirds, or q larger under grouped-query
        attention (phi3), in the ratio of the attention's query and key-value heads."""
        cfg = getattr(self.role(layer, "attn"), "config", None)
        heads, kv = (self.num_heads(cfg), self.num_kv_heads(cfg)) if cfg is not None else (1, 1)
        kv_rows = rows * kv // (heads + 2 * kv)
        return [rows - 2 * kv_rows, kv_rows, kv_rows]

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
        return isinstance(mod, STAND_INS)

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

    # ---------------- residual-stream taps (used by the prune pass) ----------------

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

    # ---------------- config facts ----------------
    # What a transformers config calls each fact: the only place squeeze reads config keys.
    # GPT-2's n_positions / n_layer / n_head / n_embd answer to these names through its
    # config's attribute_map.

    LAYER_COUNT_KEY: ClassVar[str] = "num_hidden_layers"

    @staticmethod
    def hidden_size(config) -> int:
        return int(config.hidden_size)

    @staticmethod
    def num_heads(config) -> int:
        return int(config.num_attention_heads)

    @staticmethod
    def num_kv_heads(config) -> int:
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)

    @classmethod
    def config_layers(cls, config) -> int:
        """The layer count the config declares (the model may hold fewer after a block drop)."""
        return int(getattr(config, cls.LAYER_COUNT_KEY))

    @staticmethod
    def intermediate_size(config) -> int:
        """The MLP's hidden width (GPT-2: ``n_inner``, 4x the hidden size when unset)."""
        inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        return int(inner or 4 * int(config.hidden_size))

    @staticmethod
    def vocab_size(config) -> int:
        """The vocabulary size; 0 for a model without one (vision)."""
        return int(getattr(config, "vocab_size", 0) or 0)

    @staticmethod
    def max_positions(config) -> int | None:
        """The longest sequence the position embeddings cover; None where unbounded or unknown."""
        value = getattr(config, "max_position_embeddings", None)
        return int(value) if value else None

    @staticmethod
    def image_shape(config) -> tuple[int, int]:
        """(channels, side) of the square images a vision model takes."""
        return int(config.num_channels), image_size(config)

    @staticmethod
    def patch_size(config) -> Any:
        """The patch size as the config states it (an int or a pair); None without patches."""
        return getattr(config, "patch_size", None)

    @staticmethod
    def layer_scaled_attention(config) -> bool:
        """GPT-2's ``scale_attn_by_inverse_layer_idx``: attention scaled by 1 / (layer index + 1)."""
        return bool(getattr(config, "scale_attn_by_inverse_layer_idx", False))


def image_size(config) -> int:
    """The side of the square images a vision config takes (an int or an (h, w) pair in configs)."""
    size = config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)
