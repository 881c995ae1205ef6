"""compressed-tensors out and in: integer weights in the format transformers and vLLM load.

``squeeze quantize ... --format compressed-tensors`` writes a folder whose config.json is the
model's own (its real ``model_type`` and architecture) plus a ``quantization_config`` with
``quant_method: compressed-tensors``, and whose safetensors hold, per quantized linear,

* 8 bits (``int-quantized``): ``weight`` int8 codes, ``weight_scale`` (out, 1) or (out, groups);
* 2 / 4 bits on squeeze's asymmetric grid: the same (``int-quantized``, ``num_bits`` 4, one code
  per byte) plus ``weight_zero_point`` (out, groups) int8. compressed-tensors' own
  ``pack-quantized`` would halve the file, but with zero points it does not load through
  transformers (0.20.1 writes the zero points packed and allocates them unpacked at load: a size
  mismatch), so squeeze does not write it; it reads it (symmetric W4A16 from llm-compressor),
  ``weight_packed`` holding codes + 2^(bits-1) packed into int32 along the input, code i at bit
  ``bits * i``, the zero points packed the same way along the output rows;

and per quantized embedding table an ``int-quantized`` asymmetric int8 table. The dequantized
weight is ``(q - z) * s`` in both conventions: squeeze's unsigned codes and zero points become
compressed-tensors' signed ones by subtracting ``2^(bits-1)`` from both. With ``--activations
dynamic`` every linear gets ``input_activations`` int8, per tensor, asymmetric, dynamic: the
range rule of ONNX Runtime's DynamicQuantizeLinear (min/max widened to 0, 255 levels), so plain
transformers computes what squeeze's twin computes, up to float rounding.

What the format cannot hold is refused before any work (``check``): static or block-wise
activations (calibrated per-channel reparameterizations, log-sqrt2 softmax), codes wider than
8 bits, and a model that is no longer the plain architecture (pruned sublayers). A smoothing
scale left on a linear's input (``ChannelAffine``) is folded into the producer when it is a
gated MLP's linear branch (``act(in.0) * in.1``: scaling the rows of ``in.1`` scales the input of
``mlp_out`` exactly, for integer weights through their per-row scales); elsewhere (GQA's
attention output, a GELU MLP) it cannot be, and dynamic smoothing there is refused.

Reading: a squeeze folder in this format rebuilds its integer modules from ``squeeze.json`` and
takes the codes back (``load_into``); any other compressed-tensors folder (llm-compressor's
int4 / int8 W4A16, W8A8 ...) is de-quantized to a float model that every pass takes as input
(``dequantized_state``), as GGUF files are.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from squeeze.compress.errors import SqueezeError

NAME = "compressed-tensors"
FORMATS = ("squeeze", NAME)
PACK_BITS = (2, 4)  # bits that divide 32: compressed-tensors' dense packing is then word-aligned
CT_VERSION = "0.20.1"  # the compressed-tensors release these folders were tested with (load and write)
_SUFFIXES = ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight")


# --------------------------------------------------------------------------------------------
# What can be written
# --------------------------------------------------------------------------------------------


def requested(edits: list[dict[str, Any]]) -> bool:
    """Whether a manifest's quantize edit asked for this format."""
    return any(
        (e.get("pass_name") or e.get("pass")) == "quantize" and (e.get("config") or {}).get("format") == NAME
        for e in edits
        if isinstance(e, dict)
    )


def config_problem(weights_bits: int, activations: str, method: str) -> str | None:
    """Why a quantize config cannot be written in this format (None when it can)."""
    if activations not in ("none", "dynamic"):
        return (
            f"--format {NAME} holds weight-only or dynamic int8 activations, not calibrated static "
            f"ones (--activations {activations}): choose --activations none or dynamic"
        )
    if weights_bits != 8 and weights_bits not in PACK_BITS:
        return f"--format {NAME} holds int8, int4 or int2 weights, not int{weights_bits}"
    del method  # bct with --activations none is per-group weights: fine
    return None


def check(
    family, model: nn.Module, activations: str, method: str, alphas: tuple[float, ...], plain: str | None
) -> None:
    """Refuse, before any work, a quantization this format cannot hold for ``model``."""
    if plain is not None:
        raise SqueezeError(f"--format {NAME} needs the plain architecture, but {plain}; use --format squeeze")
    smoothing = method == "repquant" and activations == "dynamic" and any(a > 0 for a in alphas)
    if not smoothing:
        return
    cfg = model.config
    gated = len([k for k in _first_linears(family, model) if k.startswith("mlp_in")]) == 2
    if family.num_kv_heads(cfg) != family.num_heads(cfg) or not gated:
        why = "grouped-query attention" if gated else "a non-gated MLP"
        raise SqueezeError(
            f"--format {NAME}: dynamic smoothing of {family.name} ({why}) leaves per-channel input scales "
            "no standard linear holds; use --activations none, or --alphas 0"
        )


def _first_linears(family, model: nn.Module) -> dict[str, nn.Module]:
    layers = family.layers(model)
    return family.linears(layers[0]) if len(layers) else {}


# --------------------------------------------------------------------------------------------
# Packing (compressed-tensors' pack_to_int32 for bits dividing 32)
# --------------------------------------------------------------------------------------------


def pack(unsigned: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Unsigned codes (< 2^bits) packed into int32 words along ``dim``; element i at bit bits*i."""
    per = 32 // bits
    v = unsigned.to(torch.int64)
    if dim == 0:
        v = v.t()
    rows, cols = v.shape
    v = nn.functional.pad(v, (0, -cols % per)).reshape(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (v << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return (words.t() if dim == 0 else words).contiguous()


def unpack(words: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """The first ``n`` unsigned codes along ``dim`` of packed int32 words (int64 out)."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        w = w.t()
    shifts = torch.arange(per, dtype=torch.int64) * bits
    v = ((w[..., None] >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1)[:, :n]
    return v.t() if dim == 0 else v


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _kind(mod: nn.Module) -> str | None:
    """``linear`` / ``embedding`` / ``affine`` for the quantize pass's modules (by name: this
    module sits below checkpoint.py, the passes above it), else None."""
    if not type(mod).__module__.startswith("squeeze.compress.passes.quantize"):
        return None
    return _KINDS.get(type(mod).__name__)


_KINDS = {"QuantLinear": "linear", "QuantEmbedding": "embedding", "ChannelAffine": "affine"}


def _symmetric(bits: int) -> bool:
    """squeeze's weight grid (passes/quantize/uniform.py ``weight_grid``): signed symmetric codes
    from 8 bits, unsigned codes with a zero point below."""
    return bits >= 8


def _folded_row_scales(model: nn.Module, family) -> dict[int, torch.Tensor]:
    """id(producer linear) -> per-row factor taking in the input scale of a gated MLP's output
    linear; SqueezeError for an input scale nothing standard can hold."""
    out: dict[int, torch.Tensor] = {}
    for layer in family.layers(model):
        lins = family.linears(layer)
        for key, mod in lins.items():
            affine = getattr(mod, "affine", None) if _kind(mod) == "linear" else None
            if affine is None:
                continue
            producer = lins.get("mlp_in.1") if key == "mlp_out" and "mlp_in.2" not in lins else None
            if affine.shift is not None or producer is None:
                raise SqueezeError(
                    f"--format {NAME}: the {key} linears keep a per-channel input scale "
                    "no standard linear holds; use --activations none or --format squeeze"
                )
            out[id(producer)] = affine.scale.detach().float()
    return out


def _linear_entry(q, row: torch.Tensor | None, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    bits, blocks = int(q.w_bits), int(q.w_blocks)
    symmetric = _symmetric(bits)
    scale = q.w_scale.detach().float()
    bias = None if q.bias is None else q.bias.detach().float()
    if row is not None:
        scale = scale * row[:, None]
        bias = None if bias is None else bias * row
    t: dict[str, torch.Tensor] = {"weight_scale": scale.to(dtype)}
    offset = 0 if symmetric else 1 << (bits - 1)
    if symmetric and bits in PACK_BITS:
        t["weight_packed"] = pack(q.qweight.detach().to(torch.int64) + (1 << (bits - 1)), bits)
        t["weight_shape"] = torch.tensor([q.out_features, q.in_features])
        fmt = "pack-quantized"
    else:  # see the module docstring: asymmetric codes one per byte
        t["weight"] = (q.qweight.detach().to(torch.int16) - offset).to(torch.int8)
        fmt = "int-quantized"
    if not symmetric:
        t["weight_zero_point"] = (q.w_zero.detach().to(torch.int16) - offset).to(torch.int8)
    if bias is not None:
        t["bias"] = bias.to(dtype)
    args: dict[str, Any] = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False}
    args.update(
        {"strategy": "channel"} if blocks == 1 else {"strategy": "group", "group_size": q.in_features // blocks}
    )
    act = None
    if q.act == "dynamic":
        act = {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor", "dynamic": True}
    return t, {"weights": args, "input_activations": act, "output_activations": None, "format": fmt}


def _embedding_entry(e, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    if int(e.bits) != 8:
        raise SqueezeError(f"--format {NAME}: {e.bits}-bit embedding tables do not fit int8")
    blocks = int(e.blocks)
    scale, zero = e.scale.detach().float(), e.zero.detach().to(torch.int64) - 128
    if blocks > 1:  # squeeze's column blocks share one scale across rows: one group per block, every row
        scale = scale[None].expand(e.num_embeddings, -1).contiguous()
        zero = zero[None].expand(e.num_embeddings, -1).contiguous()
    t = {
        "weight": (e.qweight.detach().to(torch.int16) - 128).to(torch.int8),
        "weight_scale": scale.to(dtype),
        "weight_zero_point": zero.to(torch.int8),
    }
    args: dict[str, Any] = {"num_bits": 8, "type": "int", "symmetric": False, "dynamic": False}
    args.update(
        {"strategy": "tensor"} if blocks == 1 else {"strategy": "group", "group_size": e.embedding_dim // blocks}
    )
    return t, {"weights": args, "input_activations": None, "output_activations": None, "format": "int-quantized"}


def ct_state(model: nn.Module, family) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(safetensors state, quantization_config) of a quantized model in this format."""
    from safetensors.torch import _remove_duplicate_names

    from squeeze.compress import dtypes

    dtype = dtypes.storage_dtype(model)
    rows = _folded_row_scales(model, family)
    state = model.state_dict()
    for aliases in _remove_duplicate_names(state).values():
        for alias in aliases:
            del state[alias]
    owned: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, tuple[dict, list[str]]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):  # a shared affine under each reader
        kind = _kind(mod)
        if kind is not None:
            owned.update(f"{name}.{k}" for k in [*dict(mod.named_parameters()), *dict(mod.named_buffers())])
        if kind == "linear":
            tensors, scheme = _linear_entry(mod, rows.get(id(mod)), dtype)
        elif kind == "embedding":
            tensors, scheme = _embedding_entry(mod, dtype)
        else:
            if isinstance(mod, nn.Linear) and id(mod) in rows:  # a float producer takes the scale in its rows
                r = rows[id(mod)]
                state[f"{name}.weight"] = mod.weight.detach() * r[:, None]
                if mod.bias is not None:
                    state[f"{name}.bias"] = mod.bias.detach() * r
            continue
        out.update({f"{name}.{k}": v.contiguous() for k, v in tensors.items()})
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, (scheme, []))[1].append(name)
    for k, v in state.items():
        if k not in owned:
            out[k] = v.to(dtype) if v.dtype == torch.float32 else v
    config_groups = {}
    formats = set()
    for i, (scheme, names) in enumerate(groups.values()):
        formats.add(scheme["format"])
        config_groups[f"group_{i}"] = {"targets": [f"re:^{re.escape(n)}$" for n in names], **scheme}
    qcfg: dict[str, Any] = {
        "quant_method": NAME,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": CT_VERSION,
    }
    return out, qcfg


def plain_reason(model: nn.Module, family) -> str | None:
    """None when ``model`` with its integer modules read as float ones is the plain architecture."""
    from squeeze.compress.families import model_class

    have: dict[str, tuple[int, ...]] = {}
    skip: set[str] = set()
    for name, mod in model.named_modules():
        kind = _kind(mod)
        if kind in ("linear", "embedding"):
            have[f"{name}.weight"] = (int(mod.qweight.shape[0]), int(mod.qweight.shape[1]))
            skip.add(name)
        elif kind == "affine":
            skip.add(name)
        elif not type(mod).__module__.startswith(("transformers.", "torch.")):
            return f"{name or 'model'} is a {type(mod).__name__}"
    for k, v in model.state_dict().items():
        if k.rpartition(".")[0] not in skip and not any(k.startswith(s + ".") for s in skip):
            have[k] = tuple(v.shape)
    config = model.config
    try:
        with torch.device("meta"):
            plain = model_class(family, config)._from_config(config)
    except Exception as exc:  # a config transformers cannot build is not plain
        return f"its config does not build ({type(exc).__name__})"
    want = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        return f"its weights differ from the architecture's (e.g. {diff[0]})"
    return None


def write(model: nn.Module, family, config_path: Path, weights_path: Path) -> None:
    """config.json (the model's own, plus ``quantization_config``) and the compressed weights."""
    from safetensors.torch import save_file

    reason = plain_reason(model, family)
    if reason is not None:
        raise SqueezeError(f"--format {NAME} needs the plain architecture, but {reason}; use --format squeeze")
    state, qcfg = ct_state(model, family)
    config: Any = model.config  # a transformers config: plain_reason built the architecture from it
    data = json.loads(config.to_json_string())
    data["quantization_config"] = qcfg
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    save_file(state, str(weights_path), metadata={"format": "pt"})
