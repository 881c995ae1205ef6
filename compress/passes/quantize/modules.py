"""Quantized modules: what a quantized checkpoint stores and how its PyTorch twin computes.

Every module holds integer codes with their scales and zero points (safetensors stores them as
they are) and calls one ``squeeze.kernels`` operator, so that the exported ONNX graph and the
PyTorch twin compute the same integer arithmetic:

* :class:`QuantLinear` - int weights (per output channel, or per block for BCT) and one of four
  input modes: ``dynamic`` (ORT quantizes the input at run time: ``dynamic_qlinear``),
  ``static`` (calibrated per-tensor scale / zero point: ``static_qlinear``), ``block`` (BCT:
  calibrated per-block activation scales, ``quant_dequant`` + ``dequant_linear``) and ``none``
  (weight-only: ``dequant_linear``).
* :class:`ChannelAffine` - the per-channel ``x * scale + shift`` of a reparameterization that no
  norm can absorb (a post-LN encoder's norm also feeds the residual stream; the FFN output
  layer's input follows a GELU). One instance is shared by the linears reading the same tensor,
  so the graph holds one Mul (+ Add) per tensor.
* :class:`QuantEmbedding` - a uint8 table with a per-tensor (or per-block) scale and zero point,
  gathered then dequantized (what ``quantize_dynamic`` does to Gather).

Shapes depend only on the constructor arguments, so ``restructure`` rebuilds them from the
manifest and the state dict loads strictly.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

import squeeze.kernels.registry  # noqa: F401  (registers the torch.ops.squeeze operators)
from squeeze.compress.passes.quantize.uniform import weight_grid
from squeeze.kernels import dynamic_qlinear, quant_dequant
from squeeze.kernels.dequant_linear import dequantize_weight

ActMode = Literal["dynamic", "static", "block", "none"]


def code_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16


class ChannelAffine(nn.Module):
    """x * scale (+ shift), per channel (last axis)."""

    scale: torch.Tensor  # buffers (register_buffer)
    shift: torch.Tensor | None

    def __init__(self, channels: int, shift: bool):
        super().__init__()
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("shift", torch.zeros(channels) if shift else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale
        return x + self.shift if self.shift is not None else x


class QuantLinear(nn.Module):
    """A linear layer with integer weights; see the module docstring for the input modes.

    Args:
        in_features, out_features, bias: the linear's shape.
        w_bits: weight bits (codes in int8, or int16 above 8 bits).
        w_blocks: weight scale groups along the input (1 = per output channel).
        act: input mode; ``a_bits`` its bits; ``a_blocks`` the activation scale groups (``block``).
        affine: a (possibly shared) ChannelAffine applied to the input first.
    """

    w_scale: torch.Tensor  # buffers (register_buffer); a_scale / a_zero only for static / block inputs
    w_zero: torch.Tensor
    a_scale: torch.Tensor
    a_zero: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        w_bits: int = 8,
        w_blocks: int = 1,
        act: ActMode = "dynamic",
        a_bits: int = 8,
        a_blocks: int = 1,
        affine: ChannelAffine | None = None,
        a_signed: bool = False,
    ):
        super().__init__()
        if in_features % w_blocks or in_features % a_blocks:
            raise ValueError(f"{in_features} input features do not split into {w_blocks} / {a_blocks} blocks")
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.w_blocks, self.act, self.a_bits, self.a_blocks = w_bits, w_blocks, act, a_bits, a_blocks
        dt = code_dtype(w_bits)
        # codes are a frozen Parameter so parameter counts still see the layer
        self.qweight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dt), requires_grad=False)
        self.register_buffer("w_scale", torch.ones(out_features, w_blocks))
        self.register_buffer("w_zero", torch.zeros(out_features, w_blocks, dtype=dt))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        if act in ("static", "block"):
            shape = () if act == "static" else (in_features,)
            self.register_buffer("a_scale", torch.ones(shape))
            # uint8 is ONNX's container; wider activations (tests at 16 bits) need int32
            zdt = torch.int8 if a_signed else torch.uint8 if a_bits <= 8 else torch.int32  # int8: symmetric (TensorRT)
            self.register_buffer("a_zero", torch.zeros(shape, dtype=zdt))
        self.affine = affine

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) weight, for code that reads ``.weight`` (dtype, shape)."""
        return dequantize_weight(self.qweight, self.w_scale, self.w_zero)

    def set_weight(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        with torch.no_grad():
            self.qweight.copy_(codes.to(self.qweight.dtype))
            self.w_scale.copy_(scale)
            self.w_zero.copy_(zero.to(self.w_zero.dtype))
            if self.bias is not None:
                self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))

    def set_input_quant(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        with torch.no_grad():
            self.a_scale.copy_(scale.reshape(self.a_scale.shape))
            self.a_zero.copy_(torch.round(zero).reshape(self.a_zero.shape).to(self.a_zero.dtype))

    def _cached_weight(self) -> torch.Tensor:
        """The float weight the kernel computes with, cached until the codes change.

        Eager forwards use it directly (the same arithmetic as the kernel's reference, without
        converting the codes on every call); tracing and export go through the custom op.
        """
        key = (self.qweight._version, self.w_scale._version, self.w_zero._version, self.qweight.data_ptr())
        if getattr(self, "_wkey", None) != key:
            if self.act == "dynamic":
                w = dynamic_qlinear.centered_weight(self.qweight, self._zero_arg())
            else:
                w = dequantize_weight(self.qweight, self.w_scale, self.w_zero)
            self._wcache, self._wkey = w, key
        return self._wcache

    def _zero_arg(self) -> torch.Tensor | None:
        """The weight zero points the kernel gets: None on a symmetric grid (all zero), so the
        graph carries no all-zero zero-point vector (the checkpoint still stores them)."""
        if weight_grid(self.w_bits).symmetric:
            return None
        return self.w_zero.view(-1) if self.act == "dynamic" else self.w_zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.affine is not None:
            x = self.affine(x)
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()):
            w = self._cached_weight()
            if self.act == "dynamic":
                return dynamic_qlinear.compute(x, w, self.w_scale.view(-1), self.bias)
            if self.act in ("static", "block"):
                x = quant_dequant.reference(x, self.a_scale, self.a_zero, self.a_bits)
            return torch.nn.functional.linear(x, w, self.bias)
        ops = torch.ops.squeeze
        if self.act == "dynamic":
            return ops.dynamic_qlinear(x, self.qweight, self.w_scale.view(-1), self._zero_arg(), self.bias)
        if self.act == "static":
            return ops.static_qlinear(
                x, self.a_scale, self.a_zero, self.a_bits, self.qweight, self.w_scale, self._zero_arg(), self.bias
            )
        if self.act == "block":
            x = ops.quant_dequant(x, self.a_scale, self.a_zero, self.a_bits)
        return ops.dequant_linear(x, self.qweight, self.w_scale, self.w_zero, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, w{self.w_bits}x{self.w_blocks}, "
            f"act={self.act}{'' if self.act in ('dynamic', 'none') else self.a_bits}"
        )


class QuantEmbedding(nn.Module):
    """An embedding table stored as uint8 codes (int32 above 8 bits) with a per-tensor (or
    per-block) scale and zero point."""

    scale: torch.Tensor  # buffers (register_buffer)
    zero: torch.Tensor

    def __init__(
        self, num_embeddings: int, embedding_dim: int, blocks: int = 1, padding_idx: int | None = None, bits: int = 8
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.blocks, self.padding_idx = (
            num_embeddings,
            embedding_dim,
            blocks,
            padding_idx,
        )
        self.bits = bits
        dt = torch.uint8 if bits <= 8 else torch.int32
        self.qweight = nn.Parameter(torch.zeros(num_embeddings, embedding_dim, dtype=dt), requires_grad=False)
        self.register_buffer("scale", torch.ones(blocks))
        self.register_buffer("zero", torch.zeros(blocks, dtype=dt))

    @property
    def weight(self) -> torch.Tensor:
        return self._dequant(self.qweight)

    def _dequant(self, q: torch.Tensor) -> torch.Tensor:
        rep = self.embedding_dim // self.blocks
        z = self.zero.float().repeat_interleave(rep)
        return (q.float() - z) * self.scale.repeat_interleave(rep)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._dequant(self.qweight[ids])  # Gather on uint8, then Cast / Sub / Mul

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.bits} bits x{self.blocks}"
