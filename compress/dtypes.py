"""Storage dtypes: bf16 and fp16 checkpoints in, the same dtype out, fp32 arithmetic in between.

Most real decoder checkpoints store bfloat16 weights. squeeze keeps two dtypes apart:

* the *work* dtype: every loaded model is float32 in memory (``to_work``), so every pass, the
  calibration statistics, GPTQ's Hessians and the ONNX export compute as they do for an fp32
  model (bf16 matmuls against fp32 activations were the "BFloat16 != float" crash; a bf16 graph
  was the exporter's "ScalarType ComplexDouble");
* the *storage* dtype: the dtype of the folder's floating weights, kept in ``config.dtype``
  (what ``save_pretrained`` writes to config.json). After a pass, the result is rounded to it in
  memory (``round_to_storage``) before its fidelity is measured, so the ledger measures what is
  saved and a reload is bit-identical; ``state_for_saving`` casts the floating tensors on the
  way to disk. ``--dtype`` (``run.apply(dtype=...)``) picks another storage dtype.

Integer tensors (quantized codes) are never touched.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from squeeze.compress.errors import SqueezeError

WORK = torch.float32
#: user spellings -> storage dtypes
NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
_SAFETENSORS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def parse(name: str | torch.dtype | None) -> torch.dtype | None:
    """A storage dtype from its name (``bf16``, ``float16`` ...); None stays None."""
    if name is None or isinstance(name, torch.dtype):
        if name is not None and name not in NAMES.values():
            raise SqueezeError(f"--dtype: {name} is not a storage dtype (choose fp32, fp16 or bf16)")
        return name
    dtype = NAMES.get(str(name).lower().removeprefix("torch."))
    if dtype is None:
        raise SqueezeError(f"--dtype: {name!r} is not a storage dtype (choose fp32, fp16 or bf16)")
    return dtype


def name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stored_dtype(files: list[Path], config_dtype: object = None) -> torch.dtype:
    """The floating dtype most tensors of these safetensors files hold (by element count).

    Pickle files (or no floating tensor) fall back to the config's ``dtype``, then float32.
    """
    counts: Counter[torch.dtype] = Counter()
    for f in files:
        if f.suffix != ".safetensors":
            continue
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, info in header.items():
            dt = _SAFETENSORS.get(info.get("dtype")) if key != "__metadata__" else None
            if dt is not None:
                numel = 1
                for s in info.get("shape", []):
                    numel *= int(s)
                counts[dt] += numel
    if counts:
        return counts.most_common(1)[0][0]
    try:
        return parse(config_dtype) or WORK  # type: ignore[arg-type]  # any config value: parse refuses the odd ones
    except SqueezeError:
        return WORK


def storage_dtype(model: nn.Module) -> torch.dtype:
    """The dtype this model is saved in (its ``config.dtype``; float32 without one)."""
    cfg = getattr(model, "config", None)
    try:
        return parse(getattr(cfg, "dtype", None)) or WORK
    except SqueezeError:
        return WORK


def set_storage(model: nn.Module, dtype: torch.dtype) -> None:
    """Make ``dtype`` the model's storage dtype (written to config.json as ``dtype``)."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.dtype = dtype


def to_work(model: nn.Module, storage: torch.dtype) -> nn.Module:
    """Floating parameters and buffers to float32 (exact: fp16/bf16 values are fp32 values);
    ``storage`` is remembered for saving."""
    model.float()
    set_storage(model, storage)
    return model


@torch.no_grad()
def round_to_storage(model: nn.Module) -> None:
    """Round every float32 tensor of the state dict to the storage dtype, in place (and back to
    float32), so the model in memory computes exactly what the saved folder will."""
    dtype = storage_dtype(model)
    if dtype == WORK:
        return
    for t in model.state_dict().values():
        if t.dtype == WORK:
            t.copy_(t.to(dtype))


def state_for_saving(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its float32 tensors cast to the model's storage dtype."""
    dtype = storage_dtype(model)
    if dtype == WORK:
        return state
    return {k: v.to(dtype) if v.dtype == WORK else v for k, v in state.items()}
