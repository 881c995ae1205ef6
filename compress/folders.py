"""Model folders on disk: references, weight files and their checks, atomic writes, side files.

The file half of checkpoints (``checkpoint.py`` builds and saves models on top of it):

- :func:`resolve` turns a reference (a path, ``pkg:NAME[/sub/dir]``, a ``.gguf`` file, a hub id
  when the network answers) into a local folder;
- :func:`weight_files`, :func:`check_safetensors`, :func:`check_size` and :func:`sha256_of`
  refuse missing, truncated, corrupt or mismatched weights before anything reads them;
- :func:`atomic_dir` / :func:`atomic_file` write beside the target and rename into place;
- :func:`copy_side_files` carries tokenizer / processor files, never weights or configs.
- :func:`load_state_strict` / :func:`save_weights` read weights strictly and write them with
  deterministic bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family
from squeeze.compress.paths import absolute, side_files, sweep_stale, temp_name, terminate_as_interrupt

MANIFEST = "squeeze.json"
WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".data")
# step.json / original.json: a recipe run's completion marks, never carried into another folder
NOT_COPIED_NAMES = {"config.json", MANIFEST, SHARD_INDEX, "pytorch_model.bin.index.json", "step.json", "original.json"}
# A manifest is data from a file: its base config is checked against these before a model is built
# (a tampered layer count of 1000000 hung ``inspect``). Far above any model squeeze supports.
MAX_LAYERS, MAX_WIDTH, MAX_VOCAB = 1024, 1 << 16, 1 << 22
# A manifest's base may describe at most this many fp32 bytes per byte of weights on disk (pruning
# and 4-bit quantization shrink a model ~8x below its base; 64x leaves room for both).
MAX_BASE_BYTES_PER_DISK_BYTE = 64


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def resolve(ref: str | os.PathLike) -> Path:
    """Turn a model reference into a local folder: a path, ``pkg:NAME[/sub]`` or a hub id."""
    text = str(ref)
    if text.startswith("pkg:"):
        name, _, sub = text[4:].partition("/")
        spec = importlib.util.find_spec(name) if name else None
        if spec is None or not spec.submodule_search_locations:
            raise SqueezeError(f"{text}: no installed Python package named {name!r} (pip install it first)")
        path = Path(next(iter(spec.submodule_search_locations))) / sub
        if path.is_file() and path.suffix == ".gguf":  # a GGUF inside a package (gguf_input.py)
            from squeeze.compress.gguf_input import folder_for

            return folder_for(path)
        if not path.is_dir():
            raise SqueezeError(f"{text}: {path} is not a folder")
        return path
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":  # llama.cpp's format: de-quantized once into a cache folder
            from squeeze.compress.gguf_input import folder_for

            return folder_for(path)
        if not path.is_dir():
            raise SqueezeError(f"{text}: not a folder (pass the model folder, not a file)")
        return path
    if looks_like_hub_id(text):
        return _download(text)
    raise SqueezeError(f"{text}: no such folder")


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not text.startswith((".", "/", "~"))
        and all(c.isalnum() or c in "-_." for c in "".join(parts))
    )


def _download(repo_id: str) -> Path:
    """Fetch a hub id when the network answers; offline, one clear line."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    hint = f"{repo_id} looks like a Hugging Face hub id, but squeeze works offline: download it first and pass the local folder"
    if offline:
        raise SqueezeError(hint + " (HF_HUB_OFFLINE is set)")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"], etag_timeout=5)
        )
    except Exception as exc:
        raise SqueezeError(f"{hint} ({type(exc).__name__})") from None


# --------------------------------------------------------------------------------------------
# Weight files and their checks
# --------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SqueezeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SqueezeError(f"{path}: expected a JSON object")
    return data


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file before anything reads it."""
    if not path.is_file():
        raise SqueezeError(f"{path}: not a file (a folder or a device where weights should be)")
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except OSError as exc:
        raise SqueezeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise SqueezeError(f"{path}: not a valid safetensors file ({exc})") from None
    if 8 + n + end != size:
        raise SqueezeError(
            f"{path}: truncated or corrupt safetensors file ({size} bytes, header expects {8 + n + end})"
        )


def weight_files(folder: Path) -> tuple[list[Path], bool]:
    """The weight files of a folder and whether they are pickles."""
    single = folder / WEIGHTS
    if single.exists() or single.is_symlink():
        if not single.is_file():
            raise SqueezeError(f"{single}: not a file (a folder or a broken link where weights should be)")
        return [single], False
    index = folder / SHARD_INDEX
    if index.exists():
        weight_map = read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or any(
            not isinstance(n, str) or Path(n).name != n for n in weight_map.values()
        ):
            raise SqueezeError(f"{index}: weight_map must map names to plain file names in the folder")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if not names or missing:
            raise SqueezeError(f"{index}: shard(s) missing: {', '.join(missing) or 'empty weight_map'}")
        return [folder / n for n in names], False
    other = sorted(folder.glob("*.safetensors"))
    if len(other) == 1:
        return other, False
    pickles = [folder / n for n in PICKLE_NAMES if (folder / n).exists()]
    if pickles:
        return pickles, True
    raise SqueezeError(f"{folder}: no weights found (expected {WEIGHTS} or {SHARD_INDEX})")


def sha256_of(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_size(family: Family, config, files: list[Path], where: str) -> None:
    """Refuse a config far larger than its weights before a model is built from it."""
    try:
        layers = family.config_layers(config)
        width = family.hidden_size(config)
        inner = family.intermediate_size(config)
        vocab = family.vocab_size(config)
    except (AttributeError, TypeError, ValueError) as exc:
        raise SqueezeError(f"{where}: invalid config ({exc})") from None
    for name, value, top in (
        ("layers", layers, MAX_LAYERS),
        ("hidden size", width, MAX_WIDTH),
        ("intermediate size", inner, MAX_WIDTH * 8),
        ("vocabulary", vocab, MAX_VOCAB),
    ):
        if not 0 <= value <= top:
            raise SqueezeError(f"{where}: {name} {value} is out of bounds (0..{top})")
    base_bytes = 4 * (layers * (4 * width * width + 2 * width * inner) + vocab * width)  # fp32, roughly
    disk = sum(f.stat().st_size for f in files)
    if base_bytes > MAX_BASE_BYTES_PER_DISK_BYTE * disk + (1 << 20):
        raise SqueezeError(
            f"{where}: describes a model of ~{base_bytes / 2**20:.0f} MB but the weights hold "
            f"{disk / 2**20:.1f} MB; the config does not belong to these weights"
        )


# --------------------------------------------------------------------------------------------
# Atomic writes and side files
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it into place only on success.

    An existing ``target`` is refused unless ``force``; an interrupted write leaves nothing (a
    killed one leaves a hidden ``.NAME.tmp-PID`` that the next write to ``target`` removes).
    """
    target = Path(absolute(target))  # "-o ." must name the folder, not ""
    if target.exists() and not force:
        raise SqueezeError(f"{target} already exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    tmp = temp_name(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with terminate_as_interrupt():
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = temp_name(target, "old")
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Like :func:`atomic_dir` for one file."""
    target = Path(absolute(target))
    if target.exists() and not force:
        raise SqueezeError(f"{target} already exists; pass --force to overwrite it")
    if target.is_dir():
        raise SqueezeError(f"{target}: is a folder; name a file to write")
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    tmp = temp_name(target)
    with terminate_as_interrupt():
        try:
            yield tmp
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, target)


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer / processor / pooling files; never weights, configs, manifests or completion
    marks; never a symlink's target outside the model folder (refused, see compress/paths.py)."""
    for real, rel in side_files(src, NOT_COPIED_NAMES, NOT_COPIED_SUFFIXES, skip_side_dir):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real, dst / rel)


def skip_side_dir(folder: Path) -> bool:
    """Sub-folders that are not side files: caches, and other checkpoints (a run's step folders)."""
    return folder.name == "__pycache__" or (folder / MANIFEST).exists()


def check_side_files(folder: Path) -> None:
    """Refuse a folder whose side files link outside it, before any work (compress/paths.py)."""
    side_files(folder, NOT_COPIED_NAMES, NOT_COPIED_SUFFIXES, skip_side_dir)


def load_state_strict(model: nn.Module, files: list[Path]) -> None:
    """Load weight files into ``model``; a missing or unexpected key is an error (tied aliases excepted)."""
    from safetensors.torch import load_file, load_model

    if len(files) == 1:
        try:
            missing, unexpected = load_model(model, str(files[0]), strict=False)
        except RuntimeError as exc:
            raise SqueezeError(f"{files[0]}: does not match its manifest ({str(exc).splitlines()[0]})") from None
    else:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        res = model.load_state_dict(state, strict=False)
        missing, unexpected = res.missing_keys, res.unexpected_keys
        missing = [k for k in missing if not _is_tied(model, k, state)]
    if missing or unexpected:
        bad = list(missing) + list(unexpected)
        raise SqueezeError(
            f"{files[0].parent}: weights do not match the manifest ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, e.g. {bad[0]})"
        )


def _is_tied(model: nn.Module, key: str, state: dict) -> bool:
    ptrs = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    return model.state_dict()[key].data_ptr() in ptrs


def save_weights(model: nn.Module, path: Path) -> None:
    """``safetensors.torch.save_model`` with deterministic bytes.

    save_model records each dropped alias of a shared tensor as a metadata key, and safetensors
    writes its metadata map in hash order, so a model with tied weights saved three times gave
    three files. Here the aliases are dropped the same way (load_model re-ties them from the
    model) and the metadata is one key (the version is in the manifest).
    """
    from safetensors.torch import _remove_duplicate_names, save_file

    state = model.state_dict()
    for aliases in _remove_duplicate_names(state).values():
        for name in aliases:
            del state[name]
    from squeeze.compress.dtypes import state_for_saving  # in the model's storage dtype (bf16 stays bf16)

    state = state_for_saving(model, state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
