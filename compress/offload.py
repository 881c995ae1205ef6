"""Out of core: run a layer-walking pass on a model larger than memory, one decoder layer at a time.

    from squeeze.compress import offload
    offload.apply("big-model/", {"quantize": {"weights": "int8"}}, out="big-int8", max_shard_size="2GB")

* **Skeleton** (``layer_stream.py``). The architecture is built from config.json with every parameter on the meta
  device (buffers real: rotary tables, position ids). The tensors outside the transformer
  layers that a walk needs (embeddings, final norm) are read from the safetensors; the head is
  not (it is copied to the output at the end, tensor by tensor).
* **One layer at a time.** :class:`LayerStream` sits in ``capture.LAYER_STREAM`` while the pass's
  ``apply`` runs, so every ``capture.Layerwise`` walk over the skeleton onloads layer i from the
  (sharded) safetensors (``safe_open`` reads single tensors) before the walk's body and, once
  layer i has produced the inputs of layer i + 1, writes it (passes whose layers are final when
  the walk leaves them: quantize) and puts it back on the meta device. The calibration
  activations are carried from layer to layer by the walk itself, as in memory.
* **Output.** Shards are written as layers finish (``shards.ShardWriter``: one tensor in memory
  at a time); what was not written during the walk (embeddings, norms, the head, every layer of
  a prune, which only decides) is written at the end, from memory when it is materialized and
  from the source when it is still on the meta device (a pruned layer keeps its original tensors).

The pass code is the in-memory code (the same ``apply``), the same fp32 arithmetic on the same
inputs in the same order, so scores, codes and scales are bit-identical (tests/test_offload.py).
Passes that follow the same path once their non-walk work is streamed too: distill's layer-wise
losses and fuse's capture (two models: a teacher stream), factorize and reparam (whole-model
training steps); they are refused here for now.

When: ``offload=True`` asks for it; ``None`` (the CLI default) decides by :func:`fits`: out of
core when the in-memory run's fp32 weights (the loaded model and the pass's copy, 8 bytes per
parameter) exceed :data:`MEMORY_FRACTION` of the memory available now.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from squeeze.compress import dtypes
from squeeze.compress.checkpoint import (
    MANIFEST,
    BaseInfo,
    Checkpoint,
    Manifest,
    atomic_dir,
    copy_side_files,
    resolve,
    sha256_of,
    weight_files,
)
from squeeze.compress.errors import SqueezeError
from squeeze.compress.layer_stream import LayerStream, Skeleton, entries, return_freed_memory, streaming
from squeeze.compress.paths import check_output
from squeeze.compress.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter, SourceWeights, parse_size

__all__ = ["MEMORY_FRACTION", "PASSES", "LayerStream", "Skeleton", "apply", "fits", "route", "unsupported", "wanted"]

#: passes that run out of core -> whether a layer is final when the walk leaves it (written then)
PASSES: dict[str, bool] = {"quantize": True, "prune": False}
#: out of core automatically when the in-memory run would need more than this share of the
#: memory available (it also holds activations, the calibration set and Python itself)
MEMORY_FRACTION = 0.8
#: fp32 bytes per parameter an in-memory run holds: the loaded model plus the pass's copy
IN_MEMORY_BYTES_PER_PARAM = 8

# --------------------------------------------------------------------------------------------
# When
# --------------------------------------------------------------------------------------------


def available_bytes() -> int:
    """Memory available now: /proc/meminfo's MemAvailable, capped by a cgroup v2 limit."""
    avail = 1 << 62
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, int(limit) - used)
    return avail


def fits(folder: Path) -> bool:
    """Whether the in-memory run of a model folder fits (see the module docstring)."""
    files, _ = weight_files(folder)
    numel = SourceWeights([f for f in files if f.suffix == ".safetensors"]).numel()
    return IN_MEMORY_BYTES_PER_PARAM * numel <= MEMORY_FRACTION * available_bytes()


def unsupported(pass_: Any) -> str | None:
    """Why this pass (with its config) cannot run out of core; None when it can."""
    if pass_.name not in PASSES:
        return f"{pass_.name} does not run out of core yet (only {', '.join(PASSES)})"
    if getattr(pass_.config, "format", "squeeze") != "squeeze":
        return f"out of core writes squeeze folders only, not --format {pass_.config.format}"
    return None


def wanted(offload: bool | None, ref: str | os.PathLike, pass_: Any) -> bool:
    """Whether to run out of core: as asked, or (None) when the pass can and the model does not fit."""
    if offload is not None:
        why = unsupported(pass_) if offload else None
        if why is not None:
            raise SqueezeError(f"--offload: {why}")
        return offload
    if unsupported(pass_) is not None:
        return False
    folder = resolve(ref)
    if (folder / MANIFEST).exists() or not (folder / "config.json").exists():
        return False
    try:
        return not fits(folder)
    except SqueezeError:
        return False  # the ordinary load reports what is wrong with the folder


# --------------------------------------------------------------------------------------------
# Running a pass
# --------------------------------------------------------------------------------------------


def _counts(model: nn.Module) -> tuple[int, int]:
    """Parameters and in-memory bytes of the state (tied tensors once), meta tensors included."""
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    nbytes = sum(t.numel() * t.element_size() for _, _, _, t in entries(model))
    return params, nbytes


def apply(
    ref: str | os.PathLike,
    config: Any,
    *,
    data: Any = None,
    out: str | os.PathLike | None = None,
    dry_run: bool = False,
    force: bool = False,
    seed: int = 0,
    progress: Any = None,
    max_shard_size: int | str | None = None,
    dtype: str | torch.dtype | None = None,
) -> Any:
    """``run.apply`` out of core, for the passes in :data:`PASSES` on a Hugging Face folder.

    Returns the result's :class:`Checkpoint` (its model is the skeleton, back on the meta device:
    load ``out`` to use it) or, on a dry run, a ``run.Preview``. Fidelity is not measured (it
    needs a forward of both models; the ledger row says so).
    """
    from squeeze.compress.evaluate import PeakMemory
    from squeeze.compress.formats import write_config
    from squeeze.compress.passes.base import Edit, PassContext, PassReport, result_dump
    from squeeze.compress.passes.execute import check_inputs
    from squeeze.compress.run import Preview, data_spec, make_pass

    pass_ = make_pass(config if not isinstance(config, Mapping) else dict(config))
    why = unsupported(pass_)
    if why is not None:
        raise SqueezeError(f"--offload: {why}")
    shard = parse_size(max_shard_size) if max_shard_size is not None else DEFAULT_MAX_SHARD_SIZE
    save_dtype = dtypes.parse(dtype)
    folder = resolve(ref)
    if out is None and not dry_run:
        raise SqueezeError("out of core writes its result as it goes: give an output folder")
    if out is not None and not dry_run:
        check_output(out, [folder], force=force)
    if (folder / MANIFEST).exists():
        raise SqueezeError(f"{folder}: out of core reads Hugging Face folders, not squeeze folders (yet)")
    if not (folder / "config.json").exists():
        raise SqueezeError(f"{folder}: no config.json, not a Hugging Face model folder")
    return_freed_memory()
    sk = Skeleton(folder)
    model, family = sk.model, sk.family
    if save_dtype is not None:
        dtypes.set_storage(model, save_dtype)
    manifest = Manifest(
        base=BaseInfo(
            model_type=model.config.model_type,
            architecture=type(model).__name__,
            sha256=sha256_of(sk.files),
            config=model.config.to_dict(),
            source=str(ref),
        )
    )
    ckpt = Checkpoint(model=model, family=family, manifest=manifest, source=folder)
    ctx = PassContext(family=family, checkpoint=ckpt, calibration=data_spec(data), seed=seed, progress=progress)
    check_inputs(pass_, [ckpt], ctx)
    torch.manual_seed(seed)
    if dry_run:
        with streaming(LayerStream(sk, None)):
            result = pass_.preview([model], ctx)
        return Preview(pass_.name, pass_.config.model_dump(mode="json"), result_dump(result or {}), list(ctx.warnings))
    params_before, bytes_before = _counts(model)
    assert out is not None
    with atomic_dir(out, force=force) as tmp:
        copy_side_files(folder, tmp)
        stream = LayerStream(sk, ShardWriter(tmp, shard), write_on_leave=PASSES[pass_.name])
        start = time.perf_counter()
        with PeakMemory() as mem, streaming(stream):
            new = pass_.apply([model], ctx)
        seconds = time.perf_counter() - start
        files = stream.finish()
        ctx.warn("out of core: fidelity not measured (it needs a forward of both models)")
        write_config(new, family, manifest.base.config, tmp / "config.json")
        cfg = pass_.config.model_dump(mode="json")
        params_after, bytes_after = _counts(new)
        ctx.metrics["offload"] = {
            "peak_layers": stream.peak_layers,
            "layer_onloads": sum(stream.entered.values()),
            "bytes_read": sk.weights.bytes_read,
            "shards": len(files),
        }
        report = PassReport(
            name=pass_.name,
            config=cfg,
            params_before=params_before,
            params_after=params_after,
            bytes_before=bytes_before,
            bytes_after=bytes_after,
            fidelity={},
            seconds=round(seconds, 3),
            peak_mem_mb=round(mem.peak_mb, 1),
            warnings=list(ctx.warnings),
            metrics=dict(ctx.metrics),
        )
        manifest = manifest.with_edit(
            Edit(pass_name=pass_.name, config=cfg, result=result_dump(ctx.result)), report.to_dict()
        )
        manifest = manifest.model_copy(update={"weights_sha256": sha256_of(files)})
        import json

        (tmp / MANIFEST).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return Checkpoint(model=new, family=family, manifest=manifest, source=Path(out))


def route(
    ref: str | os.PathLike,
    config: Any,
    *,
    offload: bool | None = None,
    max_shard_size: int | str | None = None,
    out: str | os.PathLike | None = None,
    dry_run: bool = False,
    force: bool = False,
    **kw: Any,
) -> Any:
    """What ``squeeze prune`` / ``quantize`` call: out of core when :func:`wanted`, else
    ``run.apply`` (saved in shards of ``max_shard_size`` when given). ``kw``: ``run.apply``'s."""
    from squeeze.compress.checkpoint import save
    from squeeze.compress.run import apply as apply_in_memory
    from squeeze.compress.run import make_pass

    pass_ = make_pass(config)
    if wanted(offload, ref, pass_):
        kw.pop("trust_pickle", None)  # out of core reads safetensors only
        return apply(ref, pass_, out=out, dry_run=dry_run, force=force, max_shard_size=max_shard_size, **kw)
    if max_shard_size is None or out is None or dry_run:
        return apply_in_memory(ref, pass_, out=out, dry_run=dry_run, force=force, **kw)
    shard = parse_size(max_shard_size)
    check_output(out, [resolve(ref)], force=force)
    new = apply_in_memory(ref, pass_, force=force, **kw)
    save(new, out, force=force, max_shard_size=shard)
    return new
