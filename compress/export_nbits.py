"""4- and 8-bit weights as ONNX Runtime's blockwise kernels: ``MatMulNBits`` and ``GatherBlockQuantized``.

Every linear (and embedding table) gets unsigned codes on an asymmetric grid per block of
``block_size`` input channels (``Grid(bits, symmetric=False)``, squeeze's own range and rounding
helpers), packed two per byte at 4 bits: really 4 bits on disk. A linear that squeeze's quantize
pass already made weight-only (``QuantLinear`` with ``act="none"``: GPTQ / RepQuant rounding) keeps
its own codes, re-blocked exactly (a per-channel scale repeats over the blocks).

How the graph is found: :func:`float_twin` builds a copy of the model whose weights are the
dequantized ones and records each weight's codes under a digest of the exact float tensor the
exporter will write (``W.T`` for a MatMul, the table for a Gather). :func:`rewrite` then swaps
every MatMul / Gather whose constant matches a digest for the blockwise kernel. Validation compares
the graph with that twin, so the only differences are the kernels' accumulation order.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from squeeze.compress.families import Family
from squeeze.compress.passes.quantize.uniform import Grid, params_from_range, quantize

if TYPE_CHECKING:
    from squeeze.compress.passes.quantize.modules import QuantLinear

MS = "com.microsoft"


@dataclass
class Packed:
    """Codes of one (rows, K) weight: unsigned, per block of ``block`` along K."""

    codes: torch.Tensor  # (rows, K) integer values in [0, 2**bits)
    scales: torch.Tensor  # (rows, K // block)
    zeros: torch.Tensor  # (rows, K // block) integer values
    bits: int
    block: int

    def dequant(self) -> torch.Tensor:
        rows, k = self.codes.shape
        q = self.codes.float().view(rows, -1, self.block)
        return ((q - self.zeros.float().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)).view(rows, k)


def round_to_nearest(w: torch.Tensor, bits: int, block: int) -> Packed:
    """Min-max blockwise codes of an (rows, K) weight (K divisible by ``block``)."""
    grid = Grid(bits, symmetric=False)
    rows, k = w.shape
    wb = w.detach().float().reshape(rows, k // block, block)
    scale, zero = params_from_range(wb.amin(-1), wb.amax(-1), grid)
    codes = quantize(wb, scale.unsqueeze(-1), zero.unsqueeze(-1), grid)
    return Packed(codes.reshape(rows, k).to(torch.uint8), scale, zero.to(torch.uint8), bits, block)


def from_quant_linear(mod: QuantLinear, bits: int, block: int) -> Packed | None:
    """The codes of a weight-only ``QuantLinear`` re-blocked to ``block``; None when they do not fit."""
    if getattr(mod, "act", None) != "none" or mod.w_bits > bits:
        return None
    q, scale, zero = mod.qweight.detach().to(torch.int32), mod.w_scale.detach(), mod.w_zero.detach().to(torch.int32)
    _rows, k = q.shape
    per = k // scale.shape[1]  # the checkpoint's block
    if per % block:
        return None
    shift = -int(min(q.min(), zero.min(), 0))  # signed (symmetric) grids move up to unsigned
    rep = per // block
    codes, zeros = q + shift, (zero + shift).repeat_interleave(rep, dim=1)
    if int(codes.max()) >= 2**bits or int(zeros.max()) >= 2**bits:
        return None
    return Packed(codes.to(torch.uint8), scale.repeat_interleave(rep, dim=1), zeros.to(torch.uint8), bits, block)


def digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return hashlib.sha1(a.tobytes()).hexdigest() + str(a.shape)


def float_twin(model: nn.Module, family: Family, *, bits: int, block_size: int) -> tuple[nn.Module, dict]:
    """A copy of ``model`` computing with dequantized weights, and the codes by weight digest.

    Linears of every layer and the head become blockwise codes; so do the embedding tables
    (a head tied to its table shares the table's codes). Weights whose input width does not
    divide into blocks stay float.
    """
    from squeeze.compress.passes.quantize.modules import QuantLinear

    twin = copy.deepcopy(model)
    registry: dict[str, tuple[str, Packed]] = {}
    targets: list[nn.Module] = []
    for layer in family.layers(twin):
        targets += list(family.linears(layer).values())
    head = family.head_module(twin)
    if head is not None and (family.is_linear(head) or isinstance(head, QuantLinear)):
        targets.append(head)
    for _i, mod in enumerate(targets):
        if isinstance(mod, QuantLinear):
            packed = from_quant_linear(mod, bits, block_size)
            if packed is None:
                continue
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(packed.dequant())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            # a shared per-channel input affine (RepQuant's reparameterization) stays in front
            _replace(twin, mod, lin if mod.affine is None else nn.Sequential(mod.affine, lin))
            mod = lin
        else:
            w = family.linear_weight(mod)
            if w.shape[1] % block_size:
                continue
            packed = round_to_nearest(w, bits, block_size)
            family.set_linear_weight(mod, packed.dequant())
        deq = family.linear_weight(mod).detach().float()
        registry[digest(deq.T.numpy())] = ("matmul", packed)
        if mod is head or (head is not None and getattr(head, "weight", None) is mod.weight):
            registry[digest(deq.numpy())] = ("gather", packed)  # the tied table is this tensor
    for _key, emb in family.embedding_tables(twin):
        w = emb.weight
        if not isinstance(emb, nn.Embedding) or w.shape[1] % block_size:
            continue
        packed = round_to_nearest(w, bits, block_size)
        with torch.no_grad():
            w.copy_(packed.dequant())
        registry[digest(w.detach().numpy())] = ("gather", packed)
    return twin, registry


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for _name, mod in root.named_modules():
        for child_name, child in mod.named_children():
            if child is old:
                setattr(mod, child_name, new)
                return


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis, low bits first (ONNX Runtime's layout)."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    per = 8 // bits
    pad = (-codes.shape[-1]) % per
    if pad:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), np.uint8)], axis=-1)
    c = codes.reshape(*codes.shape[:-1], -1, per)
    out = np.zeros(c.shape[:-1], np.uint8)
    for j in range(per):
        out |= (c[..., j] << (bits * j)).astype(np.uint8)
    return out


def rewrite(model: onnx.ModelProto, registry: dict) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Swap matching MatMul / Gather nodes for MatMulNBits / GatherBlockQuantized."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_inits: list[onnx.TensorProto] = []
    counts = {"MatMulNBits": 0, "GatherBlockQuantized": 0}
    cache: dict[str, onnx.TensorProto] = {}
    nodes = []
    for node in graph.node:
        kind = {"MatMul": 1, "Gemm": 1, "Gather": 0}.get(node.op_type)
        const = inits.get(node.input[kind]) if kind is not None else None
        entry = None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain_gemm = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if (
            const is not None
            and len(const.dims) == 2
            and const.data_type == onnx.TensorProto.FLOAT
            and (node.op_type != "Gemm" or plain_gemm)
        ):
            arr = numpy_helper.to_array(const)
            entry = registry.get(digest(arr.T if attrs.get("transB", 0) else arr))
        if entry is None or entry[0] != ("gather" if node.op_type == "Gather" else "matmul"):
            nodes.append(node)
            continue
        assert const is not None  # an entry is only looked up for a constant
        p: Packed = entry[1]
        rows, k = p.codes.shape
        nb = k // p.block
        base = f"{const.name}_q{p.bits}"
        if node.op_type != "Gather":
            data = _pack(p.codes.numpy().reshape(rows, nb, p.block), p.bits)
            zp = _pack(p.zeros.numpy(), p.bits).reshape(-1)
            tensors = [
                (base + "_B", data),
                (base + "_scales", p.scales.numpy().astype(np.float32).reshape(-1)),
                (base + "_zp", zp),
            ]
            outs = list(node.output) if len(node.input) < 3 else [node.output[0] + "_nobias"]
            new = helper.make_node(
                "MatMulNBits",
                [node.input[0]] + [t[0] for t in tensors],
                outs,
                name=node.name + "_nbits",
                domain=MS,
                K=k,
                N=rows,
                bits=p.bits,
                block_size=p.block,
            )
            if len(node.input) >= 3:  # Gemm's bias
                nodes.append(new)
                new = helper.make_node("Add", [outs[0], node.input[2]], list(node.output), name=node.name + "_bias")
            counts["MatMulNBits"] += 1
        else:
            data = _pack(p.codes.numpy(), p.bits)
            tensors = [
                (base + "_table", data),
                (base + "_tscales", p.scales.numpy().astype(np.float32)),
                (base + "_tzp", _pack(p.zeros.numpy(), p.bits)),
            ]
            new = helper.make_node(
                "GatherBlockQuantized",
                [tensors[0][0], node.input[1], *[t[0] for t in tensors[1:]]],
                list(node.output),
                name=node.name + "_nbits",
                domain=MS,
                gather_axis=0,
                quantize_axis=1,
                block_size=p.block,
                bits=p.bits,
            )
            counts["GatherBlockQuantized"] += 1
        for name, arr in tensors:
            if name not in cache:
                cache[name] = numpy_helper.from_array(arr, name)
                new_inits.append(cache[name])
        nodes.append(new)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    if any(counts.values()) and not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    return model, counts
