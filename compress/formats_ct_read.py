"""compressed-tensors in: a folder in the format back to a squeeze model (the writer is
``formats_ct.py``, whose module docstring describes the layout).

A squeeze folder in this format rebuilds its integer modules from ``squeeze.json`` and takes the
codes back (``load_into``); any other compressed-tensors folder (llm-compressor's int4 / int8
W4A16, W8A8 ...) is de-quantized to a float model that every pass takes as input
(``dequantized_state`` / ``load_float``), as GGUF files are.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.formats_ct import _SUFFIXES, NAME, PACK_BITS, _kind, _symmetric, unpack


def quantization_config(config: dict[str, Any]) -> dict[str, Any] | None:
    q = config.get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == NAME else None


def is_folder(folder: Path) -> bool:
    try:
        return quantization_config(json.loads((Path(folder) / "config.json").read_text())) is not None
    except (OSError, ValueError):
        return False


def _read(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _matches(name: str, cls_name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, cls_name)


def _scheme_for(name: str, cls_name: str, qcfg: dict[str, Any]) -> dict[str, Any] | None:
    if any(_matches(name, cls_name, t) for t in qcfg.get("ignore") or []):
        return None
    for group in (qcfg.get("config_groups") or {}).values():
        if any(_matches(name, cls_name, t) for t in group.get("targets") or []):
            return group
    return None


def _codes(state: dict[str, torch.Tensor], name: str, args: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed codes, signed zero points broadcast to the scale's shape) of one module."""
    bits = int(args.get("num_bits", 8))
    scale = state[f"{name}.weight_scale"]
    if f"{name}.weight_packed" in state:
        if bits not in (*PACK_BITS, 8):
            raise SqueezeError(f"{name}: {bits}-bit packed weights are not read by squeeze ({NAME})")
        out, inn = (int(v) for v in state[f"{name}.weight_shape"].tolist())
        codes = unpack(state[f"{name}.weight_packed"], bits, inn) - (1 << (bits - 1))
        zp = state.get(f"{name}.weight_zero_point")
        if zp is not None and not args.get("symmetric", True):
            zp = unpack(zp, bits, out, dim=0) - (1 << (bits - 1)) if zp.dtype == torch.int32 else zp.to(torch.int64)
    else:
        codes = state[f"{name}.weight"].to(torch.int64)
        zp = state.get(f"{name}.weight_zero_point")
        zp = None if zp is None else zp.to(torch.int64)
    zero = torch.zeros(scale.shape, dtype=torch.int64) if zp is None else zp.reshape(scale.shape)
    return codes, zero


def dequantize(state: dict[str, torch.Tensor], name: str, args: dict[str, Any]) -> torch.Tensor:
    """The float32 weight of one compressed module: (q - z) * s, per tensor, channel or group."""
    if args.get("type", "int") != "int":
        raise SqueezeError(f"{name}: {args.get('type')} quantization is not read by squeeze ({NAME} int only)")
    codes, zero = _codes(state, name, args)
    scale = state[f"{name}.weight_scale"].float()
    strategy = args.get("strategy", "tensor")
    if strategy == "group":
        size = int(args["group_size"])
        groups = math.ceil(codes.shape[1] / size)
        s = scale.reshape(codes.shape[0], groups).repeat_interleave(size, 1)[:, : codes.shape[1]]
        z = zero.reshape(codes.shape[0], groups).repeat_interleave(size, 1)[:, : codes.shape[1]]
    elif strategy in ("channel", "tensor"):
        s, z = scale.reshape(-1, 1), zero.reshape(-1, 1)
    else:
        raise SqueezeError(f"{name}: the {strategy!r} strategy is not read by squeeze ({NAME})")
    return (codes - z).float() * s


def dequantized_state(model: nn.Module, files: list[Path], qcfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The float state dict of a compressed-tensors folder for ``model``'s architecture."""
    if qcfg.get("format") not in ("int-quantized", "pack-quantized", "naive-quantized", "mixed-precision", "dense"):
        raise SqueezeError(f"{NAME} format {qcfg.get('format')!r} is not read by squeeze (int weights only)")
    state = _read(files)
    for name, mod in model.named_modules():
        present = any(f"{name}.{s}" in state for s in ("weight_packed", "weight_scale"))
        scheme = _scheme_for(name, type(mod).__name__, qcfg) if present else None
        if scheme is None or not scheme.get("weights"):
            continue
        weight = dequantize(state, name, scheme["weights"])
        for s in _SUFFIXES:
            state.pop(f"{name}.{s}", None)
        state[f"{name}.weight"] = weight
    for k in [k for k in state if k.rpartition(".")[2].startswith(("input_", "output_"))]:
        del state[k]  # static activation scales: a float model has no use for them
    return state


def load_float(folder: Path, family, config, files: list[Path]) -> nn.Module:
    """Any compressed-tensors folder (its safetensors ``files``) as a float model, de-quantized."""
    from squeeze.compress import dtypes
    from squeeze.compress.families import build_from_config

    qcfg = getattr(config, "quantization_config", None)
    qcfg = qcfg if isinstance(qcfg, dict) else json.loads((folder / "config.json").read_text())["quantization_config"]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = build_from_config(family, config)
    state = dequantized_state(model, files, qcfg)
    _load_checked(model, state, folder)
    model.eval()
    return dtypes.to_work(model, dtypes.stored_dtype(files, getattr(config, "dtype", None)))


def _load_checked(model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    res = model.load_state_dict(state, strict=False)
    ptrs = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    missing = [
        k
        for k in res.missing_keys
        if model.state_dict()[k].data_ptr() not in ptrs and "position_ids" not in k  # tied aliases
    ]
    if missing or res.unexpected_keys:
        bad = [*missing, *res.unexpected_keys]
        raise SqueezeError(
            f"{folder}: {NAME} weights do not match the model ({len(missing)} missing, "
            f"{len(res.unexpected_keys)} unexpected, e.g. {bad[0]})"
        )


def load_into(model: nn.Module, files: list[Path]) -> None:
    """Load a squeeze folder written in this format into its replayed integer modules."""
    state = _read(files)
    folder = files[0].parent
    for name, mod in model.named_modules(remove_duplicate=False):
        kind = _kind(mod)
        if kind == "linear":
            bits = int(mod.w_bits)
            offset = 0 if _symmetric(bits) else 1 << (bits - 1)
            args = {"num_bits": bits, "symmetric": _symmetric(bits)}
            codes, zero = _codes(state, name, args)
            state[f"{name}.qweight"] = (codes + offset).to(mod.qweight.dtype)
            state[f"{name}.w_scale"] = state[f"{name}.weight_scale"].float().reshape(mod.w_scale.shape)
            state[f"{name}.w_zero"] = (zero + offset).to(mod.w_zero.dtype).reshape(mod.w_zero.shape)
        elif kind == "embedding":
            codes, zero = _codes(state, name, {"num_bits": 8, "symmetric": False})
            state[f"{name}.qweight"] = (codes + 128).to(mod.qweight.dtype)
            scale = state[f"{name}.weight_scale"].float()
            state[f"{name}.scale"] = scale.reshape(-1, mod.blocks)[0]
            state[f"{name}.zero"] = (zero.reshape(-1, mod.blocks)[0] + 128).to(mod.zero.dtype)
        elif kind == "affine":  # folded into its producer's rows when written
            state[f"{name}.scale"] = torch.ones_like(mod.scale)
            continue
        else:
            continue
        for s in _SUFFIXES:
            state.pop(f"{name}.{s}", None)
    _load_checked(model, state, folder)
