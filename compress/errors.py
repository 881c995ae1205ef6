"""Errors squeeze raises on purpose.

A :class:`SqueezeError` is a user mistake (bad path, corrupt file, wrong ratio, incompatible
models, bad recipe): the CLI prints its message as one line and exits with ``exit_code`` (2).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SqueezeError(Exception):
    """A user-facing error: one clear line, exit code 2."""

    exit_code = 2


class ValidationFailed(SqueezeError):
    """ONNX Runtime and PyTorch disagree beyond tolerance (or a readiness check failed)."""

    exit_code = 1
