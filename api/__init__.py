"""squeeze: compress transformer checkpoints and export validated ONNX graphs.

The notebook API, the same front door the CLI uses::

    from squeeze import apply, export, load
"""

from typing import Any

_FRONT_DOOR = ("apply", "evaluate", "export", "load")


def __getattr__(name: str) -> Any:
    if name in _FRONT_DOOR:  # imported on first use: `import squeeze.cli` stays light
        from squeeze.compress import run

        return getattr(run, name)
    raise AttributeError(f"module 'squeeze' has no attribute {name!r}")


__all__ = list(_FRONT_DOOR)
