"""ONNX Runtime's transformer fusions, on by default for the encoders its optimizer knows.

``squeeze export`` fuses bert-like encoders and ViT (``onnxruntime.transformers.optimizer``:
Attention, SkipLayerNormalization, EmbedLayerNormalization, BiasGelu, ...) unless ``--no-optimize``;
the fused graph is then validated against PyTorch like any other. Whatever is decided is one line
in the report (``report["fusion"]``), never a silent change:

* a family the optimizer does not fuse (decoders, other encoders): exported unfused, said so;
* ``--target tensorrt``: unfused (the fused operators are ONNX Runtime contrib ops);
* ``--weights int4|int8`` by default: everything but Attention is fused, because the fused
  Attention packs q/k/v into one weight that MatMulNBits cannot take (``--optimize`` fuses it
  anyway and leaves those weights float);
* the optimizer raising: the unfused graph is written;
* a default-fused graph failing validation: exported again unfused (``--optimize`` fails instead).

The optimizer matches the eager attention's pattern, not PyTorch's fused SDPA call, so the model
is traced with eager attention; a model whose attention is squeeze's own (static quantized
attention) keeps it, and simply gets no Attention node.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.export_graph import FUSABLE, fuse

log = logging.getLogger(__name__)

#: attention implementations the optimizer's pattern is traced from (anything else is a model's own)
_STOCK_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flex_attention")


@dataclass(frozen=True)
class Plan:
    """Whether and how to fuse one export."""

    on: bool
    auto: bool  # the default, not --optimize: a fused graph that fails validation falls back
    attention: bool = True  # fuse Attention too
    note: str | None = None  # the report's line when the plan is not "fuse everything"


def plan(optimize: bool | None, family: str, causal: bool, kind: str, *, target: str, weights: str | None) -> Plan:
    """``optimize``: True (--optimize), False (--no-optimize) or None (the default: fuse what
    ONNX Runtime's optimizer knows)."""
    known = kind == "default" and family in FUSABLE and not causal
    if optimize is True:
        if not known:
            raise SqueezeError(f"--optimize fuses encoder graphs ({', '.join(FUSABLE)}); not {family} ({kind})")
        if target != "ort":
            raise SqueezeError("--optimize writes ONNX Runtime contrib operators, which TensorRT cannot parse")
        return Plan(on=True, auto=False)
    if optimize is False:
        return Plan(on=False, auto=False, note="not fused: --no-optimize")
    if not known:
        return Plan(
            on=False,
            auto=True,
            note=f"not fused: ONNX Runtime's transformer optimizer fuses {' and '.join(FUSABLE)} encoders, "
            f"not {family} ({kind})",
        )
    if target != "ort":
        return Plan(on=False, auto=True, note="not fused: fused operators are ONNX Runtime contrib ops (TensorRT)")
    if weights is not None:
        return Plan(
            on=True,
            auto=True,
            attention=False,
            note=f"Attention not fused: its packed q/k/v weight cannot be {weights} MatMulNBits "
            "(--optimize fuses it and keeps those weights float)",
        )
    return Plan(on=True, auto=True)


@contextlib.contextmanager
def eager_attention(model: nn.Module, on: bool) -> Iterator[str | None]:
    """Trace (and validate) with eager attention while fusing; yields a note when the model's
    own attention function is kept. The model's implementation is restored afterwards."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)  # a transformers PreTrainedModel
    if not on or impl == "eager" or switch is None:
        yield None
        return
    if impl not in _STOCK_ATTENTION:
        yield f"attention kept as {impl!r} (the model's own): no Attention fusion"
        return
    switch("eager")
    try:
        yield None
    finally:
        switch(impl)


def fuse_file(
    path: Path, family, config, *, attention: bool, keep_gather: bool
) -> tuple[onnx.ModelProto | None, dict[str, int], str]:
    """Fuse the graph at ``path``: (fused model or None when the optimizer failed, fused operator
    counts, the report's line)."""
    try:
        proto, stats = fuse(
            path,
            family.name,
            family.num_heads(config),
            family.hidden_size(config),
            keep_gather=keep_gather,
            attention=attention,
        )
    except Exception as exc:  # the optimizer's own failures: the unfused graph is written, and said
        msg = str(exc).splitlines()[0][:160] if str(exc) else ""
        log.info("ONNX Runtime's optimizer failed: %s", exc)
        return None, {}, f"not fused: ONNX Runtime's optimizer failed ({type(exc).__name__}: {msg}); written unfused"
    if not stats:
        return None, {}, "not fused: ONNX Runtime's optimizer found nothing to fuse"
    return proto, stats, "fused: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items()))
