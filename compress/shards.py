"""Sharded safetensors, one tensor at a time: reading single tensors and writing shards as they fill.

Hugging Face's layout for a large checkpoint::

    model-00001-of-00003.safetensors ... model-00003-of-00003.safetensors
    model.safetensors.index.json       {"metadata": {"total_size": N}, "weight_map": {name: file}}

:class:`SourceWeights` reads one named tensor from a folder (one ``model.safetensors`` or the
shards of an index) with safetensors' ``safe_open`` (memory-mapped: only that tensor's bytes are
read), and counts what it read. :class:`ShardWriter` appends tensors to the current shard's data
file as they come (memory holds one tensor, never a shard), starts a new shard when the next
tensor would take it past ``max_shard_size``, and on :meth:`ShardWriter.close` writes each
shard's header in front of its data and renames the shards to their final ``-of-`` names (one
shard: plain ``model.safetensors``, no index, as ``save_pretrained`` does).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from squeeze.compress.errors import SqueezeError

WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
#: Hugging Face's default ``max_shard_size`` (``save_pretrained``): results above it are sharded
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_CHUNK = 1 << 24


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count, as bytes (Hugging Face's spelling)."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
        if m is None:
            raise SqueezeError(f"--max-shard-size: expected a size like 500MB, 5GB or 2GiB, got {text!r}")
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size < 1:
        raise SqueezeError(f"--max-shard-size: must be at least 1 byte, got {text!r}")
    return size


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


class SourceWeights:
    """The tensors of a model folder by name, read one at a time (see the module docstring).

    ``reads`` counts the reads of each name; ``bytes_read`` their bytes.
    """

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._open = safe_open
        self.where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    self.where[name] = f
        self.reads: Counter[str] = Counter()
        self.bytes_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of the file. The file is opened for this read alone: a mapping
        kept open would keep every page read so far resident (file-backed RSS)."""
        with self._open(str(self.where[name]), framework="pt") as fh:
            t = fh.get_tensor(name).clone()
        self.reads[name] += 1
        self.bytes_read += t.numel() * t.element_size()
        return t

    def numel(self) -> int:
        """Elements of every tensor (from the headers; nothing is read)."""
        total = 0
        for f in sorted(set(self.where.values())):
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for key, info in header.items():
                if key != "__metadata__":
                    size = 1
                    for s in info["shape"]:
                        size *= int(s)
                    total += size
        return total


class ShardWriter:
    """Append tensors to shards in ``folder`` as they come; see the module docstring."""

    def __init__(self, folder: Path, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE):
        self.folder, self.max = Path(folder), int(max_shard_size)
        self._shards: list[tuple[Path, dict[str, Any]]] = []  # (data file, header)
        self._fh: Any = None
        self._size = 0
        self.total = 0
        self.names: set[str] = set()

    def _new_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
        path = self.folder / f".shard-{len(self._shards) + 1}.data"
        self._fh = path.open("wb")
        self._shards.append((path, {}))
        self._size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors name here")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if self._fh is None or (self._size and self._size + len(data) > self.max):
            self._new_shard()
        header = self._shards[-1][1]
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._size, self._size + len(data)],
        }
        self._fh.write(data)
        self._size += len(data)
        self.total += len(data)
        self.names.add(name)

    def close(self) -> list[Path]:
        """Write the shards (and the index when there are several); return their paths in order."""
        if self._fh is None:
            self._new_shard()
        self._fh.close()
        n = len(self._shards)
        out: list[Path] = []
        weight_map: dict[str, str] = {}
        for k, (data, header) in enumerate(self._shards, start=1):
            final = self.folder / (WEIGHTS if n == 1 else shard_name(k, n))
            head = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
            head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
            with final.open("wb") as fh, data.open("rb") as src:
                fh.write(struct.pack("<Q", len(head)))
                fh.write(head)
                shutil.copyfileobj(src, fh, _CHUNK)
            data.unlink()
            out.append(final)
            weight_map.update(dict.fromkeys(header, final.name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return out


def unique_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the aliases of tied tensors, as ``safetensors.torch.save_model`` drops
    them (of the names sharing one storage, the first in sorted order stays)."""
    from safetensors.torch import _remove_duplicate_names

    state = dict(state)
    for aliases in _remove_duplicate_names(state).values():
        for name in aliases:
            del state[name]
    return state


def save_state(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int) -> list[Path]:
    """Write ``state`` (already de-aliased and in its storage dtypes) as shards in name order."""
    writer = ShardWriter(folder, max_shard_size)
    for name in sorted(state):
        writer.add(name, state[name])
    return writer.close()


def save_model(model: torch.nn.Module, folder: Path, max_shard_size: int, single: Any) -> list[Path]:
    """``single(model, folder / WEIGHTS)`` (checkpoint.save_weights) when the weights fit in one
    shard of ``max_shard_size`` bytes, else the Hugging Face shards; returns the files written."""
    from squeeze.compress.dtypes import WORK, storage_dtype

    state = unique_state(model.state_dict())
    store = storage_dtype(model)
    size = sum(t.numel() * (store.itemsize if t.dtype == WORK else t.element_size()) for t in state.values())
    if size <= max_shard_size:
        single(model, folder / WEIGHTS)
        return [folder / WEIGHTS]
    return save_state({k: v.to(store) if v.dtype == WORK else v for k, v in state.items()}, folder, max_shard_size)
