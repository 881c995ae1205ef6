"""Stacking: a factorized model quantized by ``squeeze quantize`` (int8 D and int8 S values).

``squeeze quantize`` calls the three hooks below on a factorized checkpoint (``check``, ``apply``
before its own layer walk, ``restructure``): every :class:`DSLinear` becomes a
:class:`DSLinearInt8` holding

* D as int8 codes with one symmetric scale per output channel (row of D), round to nearest;
* the S values as int8 codes with one symmetric scale per column of S (per input feature),
  after refitting them by least squares to the quantized D on their fixed support
  (``min ||D S - Dq S'||``: the S values absorb D's rounding error before being rounded
  themselves);
* the S indices unchanged (uint8 / int16) and the bias in float.

The layer stays weight-only (its input is not quantized, whatever ``--activations`` says; the
other linears are quantized by the quantize pass as usual). Codes use an int8 container for any
``--weights`` up to int8, so the bytes in the ledger are the bytes on disk. Export: one
``squeeze::DenseSparseLinearInt8`` node (``kernels/dense_sparse_linear.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import squeeze.kernels.registry  # noqa: F401  (registers the torch.ops.squeeze operators)
from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family
from squeeze.compress.passes.factorize.budget import index_dtype
from squeeze.compress.passes.factorize.dslinear import DSLinear
from squeeze.compress.passes.factorize.solver import refit, to_dense
from squeeze.kernels.dense_sparse_linear import dequantize, quantize_rows, sparse_to_dense

#: linears that read one input and that the quantize pass transforms together (engine groups)
_SHARED_INPUT = (("q", "k", "v", "qkv"), ("mlp_in",))


class DSLinearInt8(nn.Module):
    """:class:`DSLinear` with int8 D (per output channel scales) and int8 S values (per column).

    Buffers: ``dense_q`` (out, k) int8, ``dense_scale`` (out, 1), ``values_q`` (s, in) int8,
    ``values_scale`` (1, in), ``indices`` (s, in) uint8 / int16; ``bias`` (out,) float.
    """

    dense_q: torch.Tensor
    dense_scale: torch.Tensor
    values_q: torch.Tensor
    values_scale: torch.Tensor
    indices: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        nnz: int,
        *,
        bias: bool,
        bits: int = 8,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not 1 <= nnz <= rank:
            raise ValueError(f"need 1 <= nnz <= rank, got nnz={nnz}, rank={rank}")
        if not 2 <= bits <= 8:
            raise ValueError(f"int8 storage holds 2..8-bit codes, got {bits}")
        self.in_features, self.out_features, self.rank, self.nnz, self.bits = (
            in_features,
            out_features,
            rank,
            nnz,
            bits,
        )
        self.register_buffer("dense_q", torch.zeros(out_features, rank, dtype=torch.int8))
        self.register_buffer("dense_scale", torch.ones(out_features, 1, dtype=dtype))
        self.register_buffer("values_q", torch.zeros(nnz, in_features, dtype=torch.int8))
        self.register_buffer("values_scale", torch.ones(1, in_features, dtype=dtype))
        rows = torch.arange(nnz).unsqueeze(1).expand(nnz, in_features)
        self.register_buffer("indices", rows.to(index_dtype(rank)).contiguous())
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_dslinear(cls, m: DSLinear, bits: int = 8, refit_values: bool = True) -> DSLinearInt8:
        """Quantize D per row, refit the S values to the quantized D (optional), quantize them per column."""
        q = cls(m.in_features, m.out_features, m.rank, m.nnz, bias=m.bias is not None, bits=bits, dtype=m.dense.dtype)
        d = m.dense.detach().double()
        vals, idx = m.values.detach().double(), m.indices.long()
        dq, dscale = quantize_rows(d, bits)
        if refit_values:
            d_hat = dequantize(dq, dscale)
            w = d @ to_dense(vals, idx, m.rank)  # (out, in): what the float layer computes
            vals = refit(d_hat.t() @ d_hat, d_hat.t() @ w, idx)
        vq, vscale = quantize_rows(vals.t(), bits)  # one scale per column of S
        with torch.no_grad():
            q.dense_q.copy_(dq)
            q.dense_scale.copy_(dscale)
            q.values_q.copy_(vq.t())
            q.values_scale.copy_(vscale.t())
            q.indices.copy_(m.indices)
            if m.bias is not None and q.bias is not None:
                q.bias.copy_(m.bias.detach())
        return q

    @property
    def dense(self) -> torch.Tensor:
        """D dequantized (out, k)."""
        return dequantize(self.dense_q, self.dense_scale)

    @property
    def values(self) -> torch.Tensor:
        """The S values dequantized (s, in)."""
        return dequantize(self.values_q, self.values_scale)

    def sparse_dense(self) -> torch.Tensor:
        return sparse_to_dense(self.values, self.indices, self.rank)

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) product of the dequantized factors."""
        return self.dense @ self.sparse_dense()

    def stored_bytes(self) -> int:
        """Bytes of every tensor this layer stores (codes, scales, indices, bias)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def _cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(
            (t._version, t.data_ptr())
            for t in (self.dense_q, self.dense_scale, self.values_q, self.values_scale, self.indices)
        )
        if getattr(self, "_key", None) != key:
            self._d, self._s, self._key = self.dense, self.sparse_dense(), key
        return self._d, self._s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            return torch.ops.squeeze.dense_sparse_linear_int8(
                x, self.dense_q, self.dense_scale, self.values_q, self.values_scale, self.indices, self.bias
            )
        d, s = self._cached()
        return nn.functional.linear(nn.functional.linear(x, s), d, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, nnz={self.nnz}, int{self.bits}"


# --------------------------------------------------------------------------------------------
# Hooks called by the quantize pass
# --------------------------------------------------------------------------------------------


def check(family: Family, model: nn.Module, w_bits: int) -> None:
    """Refuse what quantize cannot take: modules of other passes, int8 DS layers, > 8-bit DS codes."""
    for layer in family.layers(model):
        for role, m in family.linears(layer).items():
            if family.is_linear(m):
                continue
            if isinstance(m, DSLinearInt8):
                raise SqueezeError("this checkpoint is already quantized; quantize the float checkpoint instead")
            if not isinstance(m, DSLinear):
                raise SqueezeError(
                    f"the {role} linears of this checkpoint were replaced by another pass "
                    f"({type(m).__name__}); quantize the float checkpoint"
                )
            if w_bits > 8:
                raise SqueezeError(f"factorized linears store int8 codes: --weights int{w_bits} is wider than int8")


def quantize(model: nn.Module, family: Family, w_bits: int) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Swap every DSLinear for a DSLinearInt8 in place; returns (manifest specs, warnings)."""
    specs: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for i, layer in enumerate(family.layers(model)):
        lins = family.linears(layer)
        for key, m in lins.items():
            if isinstance(m, DSLinear):
                family.set_linear(layer, key, DSLinearInt8.from_dslinear(m, w_bits))
                spec = {"in": m.in_features, "out": m.out_features, "rank": m.rank, "nnz": m.nnz}
                specs.setdefault(str(i), {})[key] = {**spec, "bias": m.bias is not None, "bits": w_bits}
        for roles in _SHARED_INPUT:
            shared = [(k, m) for k, m in lins.items() if k.partition(".")[0] in roles]
            plain = [k for k, m in shared if family.is_linear(m)]
            if plain and len(plain) < len(shared):
                warnings.append(f"layer {i}: {', '.join(plain)} share an input with factorized linears and stay float")
    return specs, warnings


def rebuild(model: nn.Module, family: Family, specs: dict[str, dict[str, Any]]) -> nn.Module:
    """Re-create the DSLinearInt8 modules from the manifest (weights come from the file)."""
    layers = family.layers(model)
    for idx, by_key in specs.items():
        for key, s in by_key.items():
            mod = DSLinearInt8(s["in"], s["out"], s["rank"], s["nnz"], bias=s["bias"], bits=s["bits"])
            family.set_linear(layers[int(idx)], key, mod)
    return model
