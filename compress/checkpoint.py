"""Checkpoints: load and save, manifest replay, safe formats only, atomic writes.

Input: a Hugging Face model folder (``config.json`` + ``model.safetensors``, sharded or not), a
``pkg:NAME[/sub/dir]`` reference to a folder inside an installed Python package, or a folder
squeeze wrote (with ``squeeze.json``). Pickle weights are refused unless ``trust_pickle`` (and
then read with ``weights_only=True``). A hub id is only fetched when the network answers;
offline it gets a one-line error.

Output folder::

    config.json         the config of the resulting model (plain transformers can load it when
                        the result is still plain Hugging Face, e.g. after whole-block drops)
    model.safetensors   written with safetensors' save_model (tied weights survive)
    squeeze.json        the manifest: base config + sha256, the edits, the ledger
    tokenizer / processor files, copied over

Loading a squeeze folder builds the *base* architecture from the manifest (not from
config.json), replays every edit's ``restructure``, then loads the state dict strictly: a
missing or unexpected key is an error, never a silent random init.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family, build_from_config, family_for, model_class
from squeeze.compress.paths import absolute, check_output, side_files, sweep_stale, temp_name, terminate_as_interrupt
from squeeze.compress.shards import DEFAULT_MAX_SHARD_SIZE, save_model

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

#: re-creates one manifest edit's structural change: (model, raw edit dict, family) -> model
Replay = Callable[[nn.Module, dict, Family], nn.Module]

MANIFEST = "squeeze.json"
WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".data")
# step.json / original.json: a recipe run's completion marks, never carried into another folder
_NOT_COPIED_NAMES = {"config.json", MANIFEST, SHARD_INDEX, "pytorch_model.bin.index.json", "step.json", "original.json"}
# A manifest is data from a file: its base config is checked against these before a model is built
# (a tampered ``num_hidden_layers: 1000000`` hung ``inspect``). Far above any model squeeze supports.
MAX_LAYERS, MAX_WIDTH, MAX_VOCAB = 1024, 1 << 16, 1 << 22
# A manifest's base may describe at most this many fp32 bytes per byte of weights on disk (pruning
# and 4-bit quantization shrink a model ~8x below its base; 64x leaves room for both).
MAX_BASE_BYTES_PER_DISK_BYTE = 64


def squeeze_version() -> str:
    from squeeze.compress.version import __version__

    return __version__


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


class BaseInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_type: str
    architecture: str
    sha256: str
    config: dict[str, Any]
    source: str | None = None


class Manifest(BaseModel):
    """``squeeze.json``: how to rebuild a checkpoint from its base, and what each step did."""

    model_config = ConfigDict(extra="forbid")

    format: int = 1
    squeeze_version: str = Field(default_factory=squeeze_version)
    base: BaseInfo
    edits: list[dict[str, Any]] = Field(default_factory=list)
    ledger: list[dict[str, Any]] = Field(default_factory=list)
    # sha256 of this folder's own weight files, checked on load (None in folders written before it)
    weights_sha256: str | None = None

    def with_edit(self, edit, report: dict[str, Any]) -> Manifest:
        return self.model_copy(
            update={
                "edits": [*self.edits, edit.dump()],
                "ledger": [*self.ledger, report],
                "squeeze_version": squeeze_version(),
            },
            deep=True,
        )


@dataclass
class Checkpoint:
    """A model in memory with its family, manifest and the folder its side files come from."""

    model: nn.Module
    family: Family
    manifest: Manifest
    source: Path | None = None
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def config(self):
        return self.model.config

    def tokenizer(self):
        """The checkpoint's tokenizer, or None when the folder has none."""
        if self._tokenizer is None and self.source is not None and self.family.modality == "text":
            if any(
                (self.source / n).exists() for n in ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")
            ):
                from transformers import AutoTokenizer

                try:
                    self._tokenizer = AutoTokenizer.from_pretrained(str(self.source), local_files_only=True)
                except Exception as exc:  # a broken tokenizer must not stop weight-only work
                    log.warning("could not load the tokenizer of %s: %s", self.source, exc)
        return self._tokenizer


# --------------------------------------------------------------------------------------------
# Resolving references
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
    if _looks_like_hub_id(text):
        return _download(text)
    raise SqueezeError(f"{text}: no such folder")


def _looks_like_hub_id(text: str) -> bool:
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
# Loading
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
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
        weight_map = _read_json(index).get("weight_map", {})
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
        layers = int(config.num_hidden_layers)
        width = family.hidden_size(config)
        inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * width
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        inner = int(inner)
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


def load(ref: str | os.PathLike, *, trust_pickle: bool = False, replay: Replay | None = None) -> Checkpoint:
    """Load a checkpoint (Hugging Face folder, ``pkg:`` reference or squeeze folder).

    A squeeze folder's edits are replayed by ``replay(model, raw_edit, family) -> model``
    (``passes.replay_edit``; ``squeeze.compress.load`` = ``run.load`` passes it, so this module
    never imports a pass). Without it, the one late-bound import below finds it (kept for callers
    of ``checkpoint.load``; tests/test_imports.py lists it).
    """
    folder = resolve(ref)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise SqueezeError(f"{folder}: no config.json, not a Hugging Face model folder")
    side_files(folder, _NOT_COPIED_NAMES, _NOT_COPIED_SUFFIXES, _skip_side_dir)  # links checked before any work
    if (folder / MANIFEST).exists():
        if replay is None:
            from squeeze.compress.passes import replay_edit

            replay = replay_edit
        return _load_squeeze(folder, replay)
    config_dict = _read_json(config_path)
    family = family_for(config_dict.get("model_type"))
    files, is_pickle = weight_files(folder)
    if is_pickle and not trust_pickle:
        raise SqueezeError(
            f"{files[0]}: pickle weights can run arbitrary code; convert to safetensors or pass --trust-pickle"
        )
    for f in files:
        if f.suffix == ".safetensors":
            check_safetensors(f)
    from squeeze.compress import formats_ct  # another tool's compressed-tensors folder: de-quantized

    if formats_ct.quantization_config(config_dict) is not None:
        model = formats_ct.load_float(folder, family, _hf_config(folder), files)
    else:
        model = _load_hf(folder, family, config_dict, use_safetensors=not is_pickle)
    manifest = Manifest(
        base=BaseInfo(
            model_type=config_dict["model_type"],
            architecture=type(model).__name__,
            sha256=sha256_of(files),
            config=cast("PretrainedConfig", model.config).to_dict(),
            source=str(ref),
        )
    )
    return Checkpoint(model=model, family=family, manifest=manifest, source=folder)


def _hf_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise SqueezeError(f"{folder}/config.json: {exc}") from None


def _load_hf(folder: Path, family: Family, config_dict: dict, *, use_safetensors: bool) -> nn.Module:
    config = _hf_config(folder)
    check_size(family, config, weight_files(folder)[0], f"{folder}/config.json")
    cls = model_class(family, config)
    try:
        # ignore_mismatched_sizes: a mismatch lands in ``info`` and is reported below in our words
        # (transformers' own error ends "look at the above report!", with nothing above).
        model, info = cls.from_pretrained(
            str(folder),
            config=config,
            local_files_only=True,
            output_loading_info=True,
            use_safetensors=use_safetensors,
            ignore_mismatched_sizes=True,
        )
    except SqueezeError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        if "weights_only" in str(exc):  # torch's advice is to turn the safety off: never give it
            first = "the pickle holds objects a safe load (weights_only=True) refuses; convert it to safetensors"
        raise SqueezeError(f"{folder}: could not load weights ({type(exc).__name__}: {first})") from None
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        what = missing or [str(m[0]) if isinstance(m, tuple) else str(m) for m in mismatched]
        raise SqueezeError(
            f"{folder}: weights do not match the config ({len(what)} missing or mismatched, e.g. {what[0]})"
        )
    if info.get("unexpected_keys"):
        log.info("%s: ignored %d weights the architecture has no use for", folder, len(info["unexpected_keys"]))
    model.eval()
    from squeeze.compress import dtypes  # bf16 / fp16 folders: fp32 in memory, their own dtype on disk

    stored = config_dict.get("dtype", config_dict.get("torch_dtype"))
    return dtypes.to_work(model, dtypes.stored_dtype(weight_files(folder)[0], stored))


def _load_squeeze(folder: Path, replay: Replay) -> Checkpoint:
    from transformers import AutoConfig

    try:
        manifest = Manifest.model_validate(_read_json(folder / MANIFEST))
    except SqueezeError:
        raise
    except Exception as exc:
        raise SqueezeError(f"{folder / MANIFEST}: invalid manifest ({str(exc).splitlines()[0]})") from None
    if manifest.format != 1:
        raise SqueezeError(f"{folder / MANIFEST}: manifest format {manifest.format} is newer than this squeeze")
    family = family_for(manifest.base.model_type)
    files, _ = weight_files(folder)
    for f in files:
        check_safetensors(f)
    if manifest.weights_sha256 is not None and sha256_of(files) != manifest.weights_sha256:
        raise SqueezeError(f"{folder}: weights changed since squeeze wrote them (sha256 differs from {MANIFEST})")
    cfg = dict(manifest.base.config)
    cfg.pop("model_type", None)
    where = f"{folder / MANIFEST}"
    try:
        config = AutoConfig.for_model(manifest.base.model_type, **cfg)
    except Exception as exc:
        raise SqueezeError(f"{where}: invalid base config ({type(exc).__name__}: {exc})") from None
    config.architectures = [manifest.base.architecture]
    check_size(family, config, files, where)
    model = build_from_config(family, config)
    for n, raw in enumerate(manifest.edits):
        pass_name = raw.get("pass_name", raw.get("pass")) if isinstance(raw, dict) else None
        try:
            model = replay(model, raw, family)
        except SqueezeError as exc:
            raise SqueezeError(f"{where}: edit {n} ({pass_name}): {exc}") from None
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
            # a tampered edit (bad indices, shapes, fields): the manifest is data, not code
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SqueezeError(f"{where}: edit {n} ({pass_name}) cannot be replayed ({msg})") from None
    from squeeze.compress import dtypes, formats_ct

    if formats_ct.is_folder(folder):  # written with --format compressed-tensors
        formats_ct.load_into(model, files)
    else:
        _load_state_strict(model, files)
    dtypes.to_work(model, dtypes.stored_dtype(files))
    model.eval()
    return Checkpoint(model=model, family=family, manifest=manifest, source=folder)


def _load_state_strict(model: nn.Module, files: list[Path]) -> None:
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


# --------------------------------------------------------------------------------------------
# Saving, atomically
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


def save(
    ckpt: Checkpoint, out: str | os.PathLike, *, force: bool = False, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
) -> Path:
    """Write a checkpoint folder atomically; never overwrite without ``force``. Weights above
    ``max_shard_size`` bytes are written as Hugging Face shards (``shards.py``)."""
    check_output(out, [ckpt.source], force=force)  # callers check first, before the work; this is the floor
    with atomic_dir(out, force=force) as tmp:
        if ckpt.source is not None:
            copy_side_files(ckpt.source, tmp)
        from squeeze.compress import formats_ct
        from squeeze.compress.formats import write_config  # plain transformers, or refused with how to load it

        if formats_ct.requested(ckpt.manifest.edits):  # quantize --format compressed-tensors
            formats_ct.write(ckpt.model, ckpt.family, tmp / "config.json", tmp / WEIGHTS)
        else:
            write_config(ckpt.model, ckpt.family, ckpt.manifest.base.config, tmp / "config.json")
            save_model(ckpt.model, tmp, max_shard_size, save_weights)  # one file, or shards when large
        manifest = ckpt.manifest.model_copy(update={"weights_sha256": sha256_of(weight_files(tmp)[0])})
        (tmp / MANIFEST).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return Path(out)


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


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer / processor / pooling files; never weights, configs, manifests or completion
    marks; never a symlink's target outside the model folder (refused, see compress/paths.py)."""
    for real, rel in side_files(src, _NOT_COPIED_NAMES, _NOT_COPIED_SUFFIXES, _skip_side_dir):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real, dst / rel)


def _skip_side_dir(folder: Path) -> bool:
    """Sub-folders that are not side files: caches, and other checkpoints (a run's step folders)."""
    return folder.name == "__pycache__" or (folder / MANIFEST).exists()


# --------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """Facts about a checkpoint for ``squeeze inspect``."""
    from squeeze.compress.evaluate import count_params, model_bytes

    cfg = cast("PretrainedConfig", ckpt.model.config)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in ckpt.model.state_dict().values()})
    on_disk = None
    if ckpt.source is not None:
        try:
            on_disk = sum(f.stat().st_size for f in weight_files(ckpt.source)[0])
        except SqueezeError:
            on_disk = None
    return {
        "path": str(ckpt.source) if ckpt.source else None,
        "family": ckpt.family.name,
        "model_type": ckpt.manifest.base.model_type,
        "architecture": type(ckpt.model).__name__,
        "params": count_params(ckpt.model),
        "layers": ckpt.family.num_layers(ckpt.model),
        "heads": int(cfg.num_attention_heads),
        "hidden_size": int(cfg.hidden_size),
        "kv_heads": ckpt.family.num_kv_heads(cfg),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "max_positions": getattr(cfg, "max_position_embeddings", None),
        "dtype": str(getattr(cfg, "dtype", None) or "float32").removeprefix("torch."),  # as stored on disk
        "dtypes": dtypes,
        "bytes_in_memory": model_bytes(ckpt.model),
        "bytes_on_disk": on_disk,
        "sha256": ckpt.manifest.base.sha256,
        "edits": ckpt.manifest.edits,
        "ledger": ckpt.manifest.ledger,
    }
