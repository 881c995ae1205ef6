"""Weight spaces: which rows and columns of a model's stored tensors permute together (as
mergekit's architecture files and git re-basin's permutation specs record them). A *space* is a set of tensor axes that
index the same neurons: permuting all of them by one (structured) permutation leaves the model's
function unchanged. Per model: the residual stream (``residual``); per layer i: the attention
query/key space (``layers.i.qk``, Q and K rows share one head-structured permutation), the
value/output space (``layers.i.vo``, V rows and W_O columns, same head permutation as Q/K) and
the MLP hidden (``layers.i.mlp``). Fusion (passes/fuse) and folding passes read these; only
this module knows the Hugging Face names behind them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families.family import Family

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
