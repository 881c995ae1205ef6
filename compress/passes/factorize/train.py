"""Training of a factorized model with the distillation engine (``compress/distill.py``).

* :func:`train_stf` swaps every :class:`DSLinear` for an :class:`STFLinear` (dense latent,
  projected in every forward, straight-through gradient), distills against the unfactorized
  teacher training only the latents and biases, and swaps the final projections back.
* :func:`finetune` then trains D, the S values and the biases of the DSLinears on their frozen
  supports (every other weight stays frozen in both).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from squeeze.compress.families import Family
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


def _owned(modules: list[nn.Module]):
    ids = {id(p) for m in modules for p in m.parameters()}
    return lambda name, p: id(p) in ids


def _run(
    model: nn.Module, teacher: nn.Module, ctx: PassContext, steps: int, lr: float, trainable, seed: int
) -> dict[str, Any]:
    from squeeze.compress.distill import DistillConfig, distill

    cfg = DistillConfig(steps=steps, lr=lr, seed=seed)
    res = distill(model, teacher, ctx.calib_batches(), cfg, ctx, trainable=trainable)
    out = res.model_dump(mode="json")
    out.pop("loss_curve", None)
    return out


def train_stf(model: nn.Module, teacher: nn.Module, family: Family, cfg, ctx: PassContext) -> dict[str, Any]:
    """STF: distill with projected latents; leaves DSLinears holding the final projections."""
    stf = _swap(model, DSLinear, lambda m: STFLinear(m.factors(), m.bias, steps=cfg.project_steps))
    before = [m.f.indices.clone() for m in stf]
    res = _run(model, teacher, ctx, cfg.stf_steps, cfg.stf_lr, _owned(stf), ctx.seed)
    moved = sum(int((m.f.indices != b).sum()) for m, b in zip(stf, before, strict=False))
    total = sum(b.numel() for b in before)
    _swap(model, STFLinear, lambda m: m.to_dslinear())
    res["support_moved"] = round(moved / max(total, 1), 4)
    return res


def finetune(model: nn.Module, teacher: nn.Module, family: Family, cfg, ctx: PassContext) -> dict[str, Any]:
    """Fine-tune D, S values and biases on the fixed supports."""
    ds = [m for m in model.modules() if isinstance(m, DSLinear)]
    return _run(model, teacher, ctx, cfg.finetune_steps, cfg.finetune_lr, _owned(ds), ctx.seed + 1)
