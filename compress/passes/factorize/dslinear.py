"""``DSLinear``: a linear layer stored as a small dense D times a column-sparse S.

    y = D (S x) + b        D (out, k) dense, S (k, in) with exactly s non-zeros per column

S is stored compactly: ``values`` (s, in) float and ``indices`` (s, in) uint8 / int16, column j
holding ``values[t, j]`` at row ``indices[t, j]`` (the rows of one column are distinct). The
shapes depend only on the constructor arguments, so ``restructure`` rebuilds the module from
the manifest and the state dict loads strictly. Eager forwards compute with a cached dense S;
tracing and export call ``torch.ops.squeeze.dense_sparse_linear`` (one ONNX node that keeps S
compact in the file).
"""

from __future__ import annotations

import torch
from torch import nn

import squeeze.kernels.registry  # noqa: F401  (registers the torch.ops.squeeze operators)
from squeeze.compress.passes.factorize.budget import index_dtype
from squeeze.compress.passes.factorize.solver import Factors
from squeeze.kernels.dense_sparse_linear import sparse_to_dense


class DSLinear(nn.Module):
    """Dense x sparse linear layer (DSFormer).

    Args:
        in_features, out_features: the replaced linear's shape.
        rank: k, the columns of D (atoms).
        nnz: s, the non-zeros in every column of S (1 <= s <= k).
        bias: whether the layer has a bias.
    """

    indices: torch.Tensor  # a buffer (register_buffer)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        nnz: int,
        *,
        bias: bool,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not 1 <= nnz <= rank:
            raise ValueError(f"need 1 <= nnz <= rank, got nnz={nnz}, rank={rank}")
        self.in_features, self.out_features, self.rank, self.nnz = in_features, out_features, rank, nnz
        self.dense = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        self.values = nn.Parameter(torch.zeros(nnz, in_features, dtype=dtype))
        rows = torch.arange(nnz).unsqueeze(1).expand(nnz, in_features)  # any valid support until loaded
        self.register_buffer("indices", rows.to(index_dtype(rank)).contiguous())
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(cls, f: Factors, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> DSLinear:
        s, n_in = f.values.shape
        mod = cls(n_in, f.dense.shape[0], f.rank, s, bias=bias is not None, dtype=dtype)
        mod.set_factors(f, bias)
        return mod

    def set_factors(self, f: Factors, bias: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            self.dense.copy_(f.dense.to(self.dense.dtype))
            self.values.copy_(f.values.to(self.values.dtype))
            self.indices.copy_(f.indices.to(self.indices.dtype))
            if bias is not None and self.bias is not None:
                self.bias.copy_(bias)

    def factors(self) -> Factors:
        return Factors(self.dense.detach(), self.values.detach(), self.indices.long())

    def sparse_dense(self) -> torch.Tensor:
        """S as a dense (k, in) matrix (differentiable in ``values``)."""
        return sparse_to_dense(self.values, self.indices, self.rank)

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) product D S, for code that reads ``.weight``."""
        return self.dense @ self.sparse_dense()

    def stored_bytes(self) -> int:
        """Bytes of every tensor this layer stores (D, S values, S indices, bias)."""
        return sum(
            t.numel() * t.element_size() for t in (self.dense, self.values, self.indices, self.bias) if t is not None
        )

    def _cached_sparse(self) -> torch.Tensor:
        if torch.is_grad_enabled() and self.values.requires_grad:
            return self.sparse_dense()  # fine-tuning: keep the graph to ``values``
        key = (self.values._version, self.indices._version, self.values.data_ptr(), self.indices.data_ptr())
        if getattr(self, "_skey", None) != key:
            self._scache, self._skey = self.sparse_dense().detach(), key
        return self._scache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            return torch.ops.squeeze.dense_sparse_linear(x, self.dense, self.values, self.indices, self.bias)
        code = nn.functional.linear(x, self._cached_sparse())  # (..., k)
        return nn.functional.linear(code, self.dense, self.bias)  # (..., out)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, nnz={self.nnz}"
