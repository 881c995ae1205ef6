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
config.json), replays every edit's ``restructure`` (through the ``replay`` its caller passes:
``squeeze.compress.load`` gives the pass registry's), then loads the state dict strictly: a
missing or unexpected key is an error, never a silent random init. Files on disk (references,
weight checks, atomic writes, side files) are ``folders.py``; their names are re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family, base_class, build_from_config, family_for, model_class
from squeeze.compress.folders import (
    MANIFEST,
    SHARD_INDEX,
    WEIGHTS,
    atomic_dir,
    atomic_file,
    check_safetensors,
    check_side_files,
    check_size,
    copy_side_files,
    load_state_strict,
    read_json,
    resolve,
    save_weights,
    sha256_of,
    weight_files,
)
from squeeze.compress.paths import check_output
from squeeze.compress.shards import DEFAULT_MAX_SHARD_SIZE, save_model

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST",
    "SHARD_INDEX",
    "WEIGHTS",
    "BaseInfo",
    "Checkpoint",
    "Manifest",
    "Replay",
    "atomic_dir",
    "atomic_file",
    "check_safetensors",
    "check_size",
    "copy_side_files",
    "describe",
    "load",
    "resolve",
    "save",
    "save_weights",
    "sha256_of",
    "squeeze_version",
    "weight_files",
]

#: re-creates one manifest edit's structural change: (model, raw edit dict, family) -> model
Replay = Callable[[nn.Module, dict, Family], nn.Module]


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
# Loading
# --------------------------------------------------------------------------------------------


def load(ref: str | os.PathLike, *, trust_pickle: bool = False, replay: Replay | None = None) -> Checkpoint:
    """Load a checkpoint (Hugging Face folder, ``pkg:`` reference or squeeze folder).

    A squeeze folder's edits are replayed by ``replay(model, raw_edit, family) -> model``, which
    a squeeze folder requires (TypeError without it): ``squeeze.compress.load`` (``run.load``)
    passes the pass registry's ``passes.replay_edit``, so this module never imports a pass.
    Plain Hugging Face folders need no ``replay``.
    """
    folder = resolve(ref)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise SqueezeError(f"{folder}: no config.json, not a Hugging Face model folder")
    check_side_files(folder)  # links checked before any work
    if (folder / MANIFEST).exists():
        if replay is None:  # a bug in the caller, not a user mistake: keeps its traceback
            raise TypeError(
                f"{folder} is a squeeze folder: rebuilding it needs replay= (squeeze.compress.load passes it)"
            )
        return _load_squeeze(folder, replay)
    config_dict = read_json(config_path)
    family = family_for(config_dict.get("model_type"))
    files, is_pickle = weight_files(folder)
    if is_pickle and not trust_pickle:
        raise SqueezeError(
            f"{files[0]}: pickle weights can run arbitrary code; convert to safetensors or pass --trust-pickle"
        )
    for f in files:
        if f.suffix == ".safetensors":
            check_safetensors(f)
    from squeeze.compress import formats_ct_read  # another tool's compressed-tensors folder: de-quantized

    if formats_ct_read.quantization_config(config_dict) is not None:
        model = formats_ct_read.load_float(folder, family, _hf_config(folder), files)
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


def _load_hf(folder: Path, family: Family, config_dict: dict, *, use_safetensors: bool, cls: Any = None) -> nn.Module:
    config = _hf_config(folder)
    check_size(family, config, weight_files(folder)[0], f"{folder}/config.json")
    cls = cls or model_class(family, config)
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
    base = base_class(family, config)
    if missing and not mismatched and cls is not base:  # a head class named over headless weights
        model = _load_hf(folder, family, config_dict, use_safetensors=use_safetensors, cls=base)
        cast(Any, model.config).architectures = [base.__name__]  # what the folder holds (plain_reason builds it)
        return model
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
        manifest = Manifest.model_validate(read_json(folder / MANIFEST))
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
    from squeeze.compress import dtypes, formats_ct_read

    if formats_ct_read.is_folder(folder):  # written with --format compressed-tensors
        formats_ct_read.load_into(model, files)
    else:
        load_state_strict(model, files)
    dtypes.to_work(model, dtypes.stored_dtype(files))
    model.eval()
    return Checkpoint(model=model, family=family, manifest=manifest, source=folder)


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
        "heads": ckpt.family.num_heads(cfg),
        "hidden_size": ckpt.family.hidden_size(cfg),
        "kv_heads": ckpt.family.num_kv_heads(cfg),
        "vocab_size": ckpt.family.vocab_size(cfg) or None,
        "max_positions": ckpt.family.max_positions(cfg),
        "dtype": str(getattr(cfg, "dtype", None) or "float32").removeprefix("torch."),  # as stored on disk
        "dtypes": dtypes,
        "bytes_in_memory": model_bytes(ckpt.model),
        "bytes_on_disk": on_disk,
        "sha256": ckpt.manifest.base.sha256,
        "edits": ckpt.manifest.edits,
        "ledger": ckpt.manifest.ledger,
    }
