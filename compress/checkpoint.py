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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family, build_from_config, family_for, model_class

log = logging.getLogger(__name__)

MANIFEST = "squeeze.json"
WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".data")
_NOT_COPIED_NAMES = {"config.json", MANIFEST, SHARD_INDEX, "pytorch_model.bin.index.json"}


def squeeze_version() -> str:
    from squeeze.compress import __version__

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

    def with_edit(self, edit, report: dict[str, Any]) -> "Manifest":
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
            if any((self.source / n).exists() for n in ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")):
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
        if not path.is_dir():
            raise SqueezeError(f"{text}: {path} is not a folder")
        return path
    path = Path(text).expanduser()
    if path.exists():
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
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise SqueezeError(f"{path}: not a valid safetensors file ({exc})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise SqueezeError(f"{path}: truncated or corrupt safetensors file ({size} bytes, header expects {8 + n + end})")


def weight_files(folder: Path) -> tuple[list[Path], bool]:
    """The weight files of a folder and whether they are pickles."""
    single = folder / WEIGHTS
    if single.exists():
        return [single], False
    index = folder / SHARD_INDEX
    if index.exists():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).exists()]
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


def load(ref: str | os.PathLike, *, trust_pickle: bool = False) -> Checkpoint:
    """Load a checkpoint (Hugging Face folder, ``pkg:`` reference or squeeze folder)."""
    folder = resolve(ref)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise SqueezeError(f"{folder}: no config.json, not a Hugging Face model folder")
    if (folder / MANIFEST).exists():
        return _load_squeeze(folder)
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
    model = _load_hf(folder, family, config_dict, use_safetensors=not is_pickle)
    manifest = Manifest(
        base=BaseInfo(
            model_type=config_dict["model_type"],
            architecture=type(model).__name__,
            sha256=sha256_of(files),
            config=model.config.to_dict(),
            source=str(ref),
        )
    )
    return Checkpoint(model=model, family=family, manifest=manifest, source=folder)


def _load_hf(folder: Path, family: Family, config_dict: dict, *, use_safetensors: bool) -> nn.Module:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise SqueezeError(f"{folder}/config.json: {exc}") from None
    cls = model_class(family, config)
    try:
        model, info = cls.from_pretrained(
            str(folder), config=config, local_files_only=True, output_loading_info=True, use_safetensors=use_safetensors
        )
    except SqueezeError:
        raise
    except Exception as exc:
        raise SqueezeError(f"{folder}: could not load weights ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
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
    return model


def _load_squeeze(folder: Path) -> Checkpoint:
    from transformers import AutoConfig

    from squeeze.compress.passes import Edit, get_pass

    try:
        manifest = Manifest.model_validate(_read_json(folder / MANIFEST))
    except SqueezeError:
        raise
    except Exception as exc:
        raise SqueezeError(f"{folder / MANIFEST}: invalid manifest ({str(exc).splitlines()[0]})") from None
    if manifest.format != 1:
        raise SqueezeError(f"{folder / MANIFEST}: manifest format {manifest.format} is newer than this squeeze")
    family = family_for(manifest.base.model_type)
    cfg = dict(manifest.base.config)
    cfg.pop("model_type", None)
    config = AutoConfig.for_model(manifest.base.model_type, **cfg)
    config.architectures = [manifest.base.architecture]
    model = build_from_config(family, config)
    for raw in manifest.edits:
        edit = Edit.model_validate(raw)
        pass_cls = get_pass(edit.pass_name)
        model = pass_cls(pass_cls.Config(**edit.config)).restructure(model, edit, family)
    files, _ = weight_files(folder)
    for f in files:
        check_safetensors(f)
    _load_state_strict(model, files)
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

    An existing ``target`` is refused unless ``force``; an interrupted write leaves nothing.
    """
    target = Path(target)
    if target.exists() and not force:
        raise SqueezeError(f"{target} already exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Like :func:`atomic_dir` for one file."""
    target = Path(target)
    if target.exists() and not force:
        raise SqueezeError(f"{target} already exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def save(ckpt: Checkpoint, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a checkpoint folder atomically; never overwrite without ``force``."""
    from safetensors.torch import save_model

    out = Path(out)
    if ckpt.source is not None and out.resolve() == ckpt.source.resolve():
        raise SqueezeError(f"{out}: refusing to overwrite the input checkpoint")
    with atomic_dir(out, force=force) as tmp:
        if ckpt.source is not None:
            copy_side_files(ckpt.source, tmp)
        config = getattr(ckpt.model, "config", None)
        if config is not None and hasattr(config, "to_json_file"):
            config.to_json_file(str(tmp / "config.json"))
        else:
            (tmp / "config.json").write_text(json.dumps(ckpt.manifest.base.config, indent=2))
        state_model = ckpt.model
        # One metadata key only: safetensors writes its metadata map in a random order, so two keys
        # would make identical saves differ byte for byte (the version is in the manifest).
        save_model(state_model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(ckpt.manifest.model_dump(mode="json"), indent=2) + "\n")
    return out


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer / processor / pooling files; never weights, configs or manifests."""
    for item in src.iterdir():
        if item.name in _NOT_COPIED_NAMES or item.name.startswith("."):
            continue
        if item.is_dir():
            if item.name not in ("__pycache__",) and not (item / MANIFEST).exists():
                shutil.copytree(item, dst / item.name, ignore=shutil.ignore_patterns(*[f"*{s}" for s in _NOT_COPIED_SUFFIXES]))
        elif not item.name.endswith(_NOT_COPIED_SUFFIXES):
            shutil.copy2(item, dst / item.name)


# --------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """Facts about a checkpoint for ``squeeze inspect``."""
    from squeeze.compress.passes.base import count_params, model_bytes

    cfg = ckpt.model.config
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
        "dtypes": dtypes,
        "bytes_in_memory": model_bytes(ckpt.model),
        "bytes_on_disk": on_disk,
        "sha256": ckpt.manifest.base.sha256,
        "edits": ckpt.manifest.edits,
        "ledger": ckpt.manifest.ledger,
    }
