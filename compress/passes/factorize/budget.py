"""Byte budget: the rank k and non-zeros s per column a factorized linear may use.

``ratio`` is the fraction of the original linear's stored weight bytes the factorized layer may
use, counting D, the S values and the S indices at their real dtypes (the bias is stored
unchanged and is not part of either side)::

    bytes(k, s) = out * k * e + in * s * (e + index_bytes(k))    <=    ratio * out * in * e

Indices are ``uint8`` while k <= 256, else ``int16``. Uniform allocation: each layer takes the
largest k whose s = density * k (N:M: s = k * n / m) fits its budget. ``ratio = 1`` is the full
factorization (k = s = min(out, in)), which is exact but stores more than the dense layer.
"""

from __future__ import annotations

import math

import torch

from squeeze.compress.errors import SqueezeError

UINT8_MAX_RANK = 256  # indices 0..255 fit a uint8


def index_dtype(k: int) -> torch.dtype:
    return torch.uint8 if k <= UINT8_MAX_RANK else torch.int16


def index_bytes(k: int) -> int:
    return torch.empty(0, dtype=index_dtype(k)).element_size()


def factor_bytes(out_f: int, in_f: int, k: int, s: int, elem: int = 4) -> int:
    """Stored bytes of D (out, k), S values (s, in) and S indices (s, in)."""
    return out_f * k * elem + in_f * s * (elem + index_bytes(k))


def nnz_for(k: int, density: float, pattern: str = "column", m: int = 4) -> int:
    """Non-zeros per column of S for rank k: density * k (N:M: n of every m rows, n = density * m)."""
    if pattern == "nm":
        n = max(1, round(density * m))
        return k // m * n
    return max(1, min(k, round(density * k)))


def choose(
    out_f: int, in_f: int, ratio: float, density: float, *, pattern: str = "column", m: int = 4, elem: int = 4
) -> tuple[int, int]:
    """(k, s) for one linear under the byte budget ``ratio * out * in * elem``."""
    full = min(out_f, in_f)
    if ratio >= 1.0:
        return full, full
    budget = ratio * out_f * in_f * elem
    step = m if pattern == "nm" else 1
    best: tuple[int, int] | None = None
    for k in range(step, full + 1, step):
        s = nnz_for(k, density, pattern, m)
        if factor_bytes(out_f, in_f, k, s, elem) > budget:
            break
        best = (k, s)
    if best is None:
        need = factor_bytes(out_f, in_f, step, nnz_for(step, density, pattern, m), elem) / (out_f * in_f * elem)
        raise SqueezeError(
            f"--ratio {ratio:g} is too small for a {out_f}x{in_f} linear: the smallest factorization "
            f"needs {math.ceil(need * 1000) / 1000:g}"
        )
    return best
