"""Recipe paths: relative references resolve against the recipe's folder (``pkg:`` refs and hub
ids are kept as written), and a model reference that cannot be used says why, before any work."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from squeeze.compress.errors import SqueezeError
from squeeze.compress.folders import looks_like_hub_id, resolve

if TYPE_CHECKING:
    from squeeze.compress.passes.base import PassConfig


def local_ref(ref: str, base_dir: Path | None) -> str:
    """A relative path is resolved against the recipe's folder; pkg: refs and hub ids are kept.

    A relative path found nowhere becomes the absolute path beside the recipe, so that the
    error names the place squeeze looked.
    """
    if base_dir is None or ref.startswith("pkg:") or Path(ref).expanduser().is_absolute():
        return ref
    cand = (base_dir / ref).resolve()
    if cand.exists() or not (Path(ref).exists() or looks_like_hub_id(ref)):
        return str(cand)
    return ref


#: calibration sources that name data, not a file (calibration.py: DataSpec.source)
NAMED_DATA = ("builtin", "synthetic", "wiki")


class _Job(Protocol):
    """The fields of a recipe job whose paths resolve (recipe.JobBase; a protocol keeps the import
    pointing from recipe.py to here only)."""

    model: str
    calibration: Any
    steps: list[Any]


def resolved_paths(job: _Job, base_dir: Path | None) -> dict[str, Any]:
    """The job's fields with relative paths resolved against ``base_dir`` (a ``model_copy`` update)."""
    update: dict[str, Any] = {"model": local_ref(job.model, base_dir)}
    if job.calibration is not None and job.calibration.source not in NAMED_DATA:
        update["calibration"] = job.calibration.model_copy(
            update={"source": local_ref(job.calibration.source, base_dir)}
        )
    steps = []
    for step in job.steps:
        refs = model_refs(step.config)
        if refs:
            cfg = step.config.model_copy(update={"others": [local_ref(r, base_dir) for r in refs]})
            step = step.model_copy(update={step.pass_name: cfg})
        steps.append(step)
    update["steps"] = steps
    return update


def model_refs(config: PassConfig) -> list[str]:
    """Extra model references of a multi-model pass (its ``others`` field, ``MultiModelConfig``)."""
    refs = getattr(config, "others", None)
    return [str(r) for r in refs] if isinstance(refs, (list, tuple)) else []


def missing(ref: str) -> str | None:
    """Why a model reference cannot be used, or None (hub ids are only checked when run)."""
    if not ref.startswith("pkg:") and not Path(ref).expanduser().exists() and looks_like_hub_id(ref):
        return None
    try:
        folder = resolve(ref)
    except SqueezeError as exc:
        return str(exc)
    if not (folder / "config.json").exists():
        return f"{ref}: no config.json, not a model folder"
    return None
