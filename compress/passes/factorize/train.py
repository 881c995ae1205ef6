"""Training of a factorized model with the distillation engine (``compress/distill.py``).

* :func:`train_stf` swaps every :class:`DSLinear` for an :class:`STFLinear` (dense latent,
  projected in every forward, straight-through gradient), distills against the unfactorized
  teacher training only the latents and biases, and swaps the final projections back.
* :func:`finetune` then trains D, the S values and the biases of the DSLinears on their frozen
  supports (every other weight stays frozen in both).

Data: ``cfg.data`` through ``compress/train_data.py`` (``auto``: the wiki text when installed,
else the built-in calibration lines; images: the calibration source). Loss: the family's output
plus, with ``loss="layers"``, every layer's hidden state against the same teacher layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from torch import nn

from squeeze.compress.passes.base import PassContext
from squeeze.compress.passes.factorize.dslinear import DSLinear
from squeeze.compress.passes.factorize.stf import STFLinear


def _swap(model: nn.Module, kind: type, make) -> list[nn.Module]:
    """Replace every module of type ``kind`` by ``make(module)``; return the new modules."""
    new = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                repl = make(child)
                setattr(parent, name, repl)
                new.append(repl)
    return new


def _owned(modules: Sequence[nn.Module]):
    ids = {id(p) for m in modules for p in m.parameters()}
    return lambda name, p: id(p) in ids


def training_data(ctx: PassContext, cfg) -> tuple[str, list]:
    """(source, batches) for the STF and the fine-tune, never the evaluation split."""
    from squeeze.compress.train_data import TrainSpec, training_batches, wiki_available

    source = cfg.data
    if source == "auto":
        if ctx.family.modality == "vision":
            source = ctx.calibration.source if ctx.calibration is not None else "synthetic"
            source = "synthetic" if source == "builtin" else source
        else:
            source = "wiki" if wiki_available() else "builtin"
    spec = TrainSpec(source=source, samples=cfg.samples, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=ctx.seed)
    return source, training_batches(ctx.checkpoint, spec, warn=ctx.warn)


def _run(
    model: nn.Module, teacher: nn.Module, ctx: PassContext, data: list, cfg, steps: int, lr: float, trainable, seed: int
) -> dict[str, Any]:
    from squeeze.compress.distill import DistillConfig, distill

    engine = DistillConfig(steps=steps, lr=lr, seed=seed, layers_weight=1.0 if cfg.loss == "layers" else 0.0)
    res = distill(model, teacher, data, engine, ctx, trainable=trainable)
    out = res.model_dump(mode="json")
    out.pop("loss_curve", None)
    return out


def train_stf(model: nn.Module, teacher: nn.Module, data: list, cfg, ctx: PassContext) -> dict[str, Any]:
    """STF: distill with projected latents; leaves DSLinears holding the final projections."""
    stf = cast(
        list[STFLinear], _swap(model, DSLinear, lambda m: STFLinear(m.factors(), m.bias, steps=cfg.project_steps))
    )
    before = [m.f.indices.clone() for m in stf]
    res = _run(model, teacher, ctx, data, cfg, cfg.stf_steps, cfg.stf_lr, _owned(stf), ctx.seed)
    moved = sum(int((m.f.indices != b).sum()) for m, b in zip(stf, before, strict=True))
    total = sum(b.numel() for b in before)
    _swap(model, STFLinear, lambda m: m.to_dslinear())
    res["support_moved"] = round(moved / max(total, 1), 4)
    return res


def finetune(model: nn.Module, teacher: nn.Module, data: list, cfg, ctx: PassContext) -> dict[str, Any]:
    """Fine-tune D, S values and biases on the fixed supports."""
    ds = [m for m in model.modules() if isinstance(m, DSLinear)]
    return _run(model, teacher, ctx, data, cfg, cfg.finetune_steps, cfg.finetune_lr, _owned(ds), ctx.seed + 1)
