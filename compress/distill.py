"""The one training loop: knowledge distillation of a student from a frozen teacher.

    result = distill(student, teacher, data, DistillConfig(steps=400), ctx)

``student`` is trained in place (in eval mode: no dropout, so a student equal to its teacher
sees exactly zero loss and zero gradients, and a resumed run is bit-identical). ``teacher`` is
a model of the same family (frozen, eval mode, no grad; restored afterwards) or a callable
``(batch, need_hidden, need_layers) -> Targets`` (an ensemble, e.g. fuse's averaged experts).
``data`` is a list of model-input batches (``squeeze.compress.train_data`` builds them from a
text / JSONL / image source with the evaluation split held apart). ``ctx`` is a
``PassContext`` (or anything with ``family``, ``warn``, ``step`` and ``metrics``).

The loop (what Minitron / TinyBERT-style healing uses): AdamW, linear warm-up then cosine
decay, gradient clipping, gradient accumulation, a fixed seed and a deterministic data order
(micro-batch ``k`` is position ``k mod n`` of the permutation ``seed + k // n``, so a resumed
run sees the same batches), teacher targets computed once per batch without grad and cached
when they fit in ``cache_mb``. Losses (weights in the config): the family's output
(``output_weight``), the last hidden state (``hidden_weight``) and every layer's output under a
layer map (``layers_weight``; student layer ``j`` learns teacher layer ``layer_map[j]``, as a
student with dropped blocks maps to the teacher's kept ones). ``precision: bf16`` runs both
forwards under CPU bf16 autocast (weights, optimizer state and losses stay fp32). Weight decay
defaults to 0: it pulls pretrained weights toward zero, away from what the student is healing
toward.

Hooks for passes that train with a schedule or a constraint: ``before_step(step, model)``
runs before each optimizer step's forward (SLAB's progressive LayerNorm -> RepBN ratio),
``after_step(step, model)`` after the update (DSFormer's projection of the factors).

Resumable: with ``workdir`` and ``save_every > 0`` the student, the optimizer, the step, the
loss curve and the RNG states are saved every N steps (atomically, ``workdir/distill_state.pt``);
a later call with the same config, data and workdir continues from there and ends with the
weights of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from squeeze.compress.distill_losses import Batch, Targets, TeacherFn, layer_loss, model_targets, norm_mse, output_loss
from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family

__all__ = ["DistillConfig", "DistillResult", "Targets", "distill", "lr_at", "micro_order", "select_parameters"]

log = logging.getLogger(__name__)

STATE_FILE = "distill_state.pt"
MAX_EPOCHS = 3.0  # more passes over the same batches than this overfits them: warn
CURVE_POINTS = 200  # the loss curve kept in the ledger, at most this many points
StepHook = Callable[[int, nn.Module], None]
Trainable = Literal["all", "norms", "attn", "mlp", "blocks"]
Precision = Literal["fp32", "bf16"]


class DistillConfig(BaseModel):
    """How to train. Frozen plain data; the student, teacher, data and hooks are arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(400, ge=1, le=10_000_000)
    lr: float = Field(1e-4, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0)
    warmup: float = Field(0.1, ge=0, lt=1, description="share of the steps spent warming up")
    min_lr: float = Field(0.0, ge=0, le=1, description="cosine floor, as a share of lr")
    grad_clip: float | None = Field(1.0, gt=0)
    accumulate: int = Field(1, ge=1, le=1024)
    seed: int = 0
    temperature: float = Field(2.0, gt=0)
    output_weight: float = Field(1.0, ge=0)
    hidden_weight: float = Field(0.0, ge=0)
    layers_weight: float = Field(0.0, ge=0)
    trainable: Trainable = "all"
    train_layers: list[int] | None = Field(None, description="only parameters inside these layers (and none outside)")
    cache_mb: float = Field(1024, ge=0, description="cache teacher targets when they fit in this much memory")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps into workdir (0: never)")
    precision: Precision = Field(
        "fp32",
        description="bf16: forwards (teacher and student) under CPU bf16 autocast, fp32 master weights, "
        "optimizer and losses (2-3x faster matmuls where the CPU has bf16 instructions)",
    )

    @model_validator(mode="after")
    def _some_loss(self) -> DistillConfig:
        if self.output_weight + self.hidden_weight + self.layers_weight <= 0:
            raise ValueError("at least one of output_weight, hidden_weight, layers_weight must be > 0")
        return self


class DistillResult(BaseModel):
    """What a distillation did (stored in the manifest and the ledger)."""

    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    loss_curve: list[tuple[int, float]]
    trainable_params: int
    trained: str
    epochs: float
    batches: int
    teacher_cached: bool
    resumed_from: int | None = None


# --------------------------------------------------------------------------------------------
# Parameter selection, schedule and data order (pure functions, tested on their own)
# --------------------------------------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def select_parameters(
    model: nn.Module,
    family: Family,
    trainable: str | Callable[[str, nn.Parameter], bool],
    layers: Iterable[int] | None = None,
) -> list[tuple[str, nn.Parameter]]:
    """The floating-point parameters to train, by role or by a predicate ``(name, param) -> bool``.

    Roles: ``all``; ``norms`` (every LayerNorm / RMSNorm); ``attn`` / ``mlp`` (the sublayers of
    each transformer layer); ``blocks`` (everything inside the transformer layers). ``layers``
    keeps only parameters inside those layer indices. Integer parameters (quantized codes) and
    tied duplicates are never listed.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    layer_list = family.layers(model)
    inside: dict[int, int] = {}  # id(param) -> layer index
    for i, layer in enumerate(layer_list):
        for p in layer.parameters():
            inside[id(p)] = i
    if callable(trainable):
        chosen = [p for n, p in model.named_parameters() if trainable(n, p)]
    elif trainable == "all":
        chosen = list(model.parameters())
    elif trainable == "norms":
        chosen = [p for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)]
    elif trainable == "blocks":
        chosen = [p for p in model.parameters() if id(p) in inside]
    elif trainable in ("attn", "mlp"):
        chosen = []
        for layer in layer_list:
            mods = family.role(layer, trainable)
            for m in mods if isinstance(mods, tuple) else (mods,):
                chosen.extend(m.parameters())
    else:
        raise SqueezeError(f"trainable must be all, norms, attn, mlp or blocks, got {trainable!r}")
    keep = set(layers) if layers is not None else None
    out, seen = [], set()
    for p in chosen:
        if id(p) in seen or not p.dtype.is_floating_point:
            continue
        if keep is not None and inside.get(id(p)) not in keep:
            continue
        seen.add(id(p))
        out.append((names.get(id(p), "?"), p))
    return out


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up over ``warmup * steps`` steps, then cosine decay to ``min_lr * lr``."""
    warm = round(cfg.warmup * cfg.steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def micro_order(k: int, n: int, seed: int) -> int:
    """The batch index of micro-batch ``k`` (0-based) over ``n`` batches: epoch ``k // n`` is a
    permutation seeded by ``seed + epoch``. A pure function, so resuming needs no sampler state."""
    epoch, pos = divmod(k, n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n, generator=g)[pos])


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _fingerprint(cfg: DistillConfig, data: list[Batch], params: list[tuple[str, nn.Parameter]]) -> str:
    h = hashlib.sha256(cfg.model_dump_json(exclude={"save_every", "cache_mb"}).encode())
    h.update(str(len(data)).encode())
    for b in data[:4] + data[-4:]:
        for k in sorted(b):
            h.update(k.encode() + str(tuple(b[k].shape)).encode() + str(float(b[k].float().sum())).encode())
    h.update(",".join(n for n, _ in params).encode())
    return h.hexdigest()[:16]


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill during the write leaves the previous state whole


def _teacher_fn(teacher: nn.Module | TeacherFn, family: Family) -> TeacherFn:
    if isinstance(teacher, nn.Module):

        def run(batch: Batch, need_hidden: bool, need_layers: bool) -> Targets:
            return model_targets(teacher, family, batch, need_hidden=need_hidden, need_layers=need_layers)

        return run
    if callable(teacher):
        return teacher
    raise TypeError(f"teacher must be a model or a callable returning Targets, got {type(teacher).__name__}")


def distill(
    student: nn.Module,
    teacher: nn.Module | TeacherFn,
    data: list[Batch],
    config: DistillConfig,
    ctx: Any,
    *,
    layer_map: list[int] | None = None,
    trainable: Callable[[str, nn.Parameter], bool] | None = None,
    before_step: StepHook | None = None,
    after_step: StepHook | None = None,
    workdir: str | os.PathLike | None = None,
) -> DistillResult:
    """Train ``student`` toward ``teacher`` in place; see the module docstring.

    Args:
        student: the model to train (its parameters' ``requires_grad`` flags are restored at the end).
        teacher: a model of the same family, or a callable returning :class:`Targets`.
        data: training batches (never the evaluation split).
        config: a :class:`DistillConfig`.
        ctx: a ``PassContext``: ``family``, ``warn``, ``step`` (progress), ``metrics``.
        layer_map: teacher layer index for each student layer (``layers_weight > 0``); default
            identity, which needs equal layer counts.
        trainable: a predicate ``(name, param) -> bool`` overriding ``config.trainable``.
        before_step, after_step: hooks ``(step, student)`` around each optimizer step.
        workdir: where resumable state goes (with ``config.save_every > 0``).

    Returns:
        A :class:`DistillResult`; also recorded in ``ctx.metrics["distill"]``.
    """
    family: Family = ctx.family
    cfg = config
    if not data:
        raise SqueezeError("distill: no training batches (the data source is empty)")
    need_layers, need_hidden = cfg.layers_weight > 0, cfg.hidden_weight > 0
    if need_layers:
        n_student = family.num_layers(student)
        layer_map = list(range(n_student)) if layer_map is None else list(layer_map)
        if len(layer_map) != n_student:
            raise SqueezeError(f"distill: the layer map has {len(layer_map)} entries, the student {n_student} layers")
    params = select_parameters(student, family, trainable or cfg.trainable, cfg.train_layers)
    if not params:
        raise SqueezeError(f"distill: nothing to train (trainable={cfg.trainable!r}, train_layers={cfg.train_layers})")
    n_train = sum(p.numel() for _, p in params)
    epochs = cfg.steps * cfg.accumulate / len(data)
    if epochs > MAX_EPOCHS:
        ctx.warn(
            f"distill: {cfg.steps} steps x {cfg.accumulate} batch(es) is {epochs:.1f} passes over {len(data)} "
            f"training batches (more than {MAX_EPOCHS:g} overfits them): give more data or fewer steps"
        )

    flags = {id(p): p.requires_grad for p in student.parameters()}
    teacher_mode = teacher.training if isinstance(teacher, nn.Module) else None
    student_mode = student.training
    for p in student.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    if isinstance(teacher, nn.Module):
        teacher.eval()
    student.eval()  # no dropout: exact zero loss on identity, bit-identical resume
    run_teacher = _teacher_fn(teacher, family)
    opt = torch.optim.AdamW(
        [p for _, p in params], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8
    )

    state_path = Path(workdir) / STATE_FILE if workdir is not None and cfg.save_every else None
    fingerprint = _fingerprint(cfg, data, params)
    start_step, curve, resumed = 0, [], None
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        if state.get("fingerprint") == fingerprint:
            student.load_state_dict(state["student"])
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            start_step, curve, resumed = int(state["step"]), [tuple(x) for x in state["curve"]], int(state["step"])
            log.info("distill: resuming at step %d from %s", start_step, state_path)
        else:
            ctx.warn(f"distill: {state_path} was written for another config or data; starting over")

    cache: dict[int, Targets] = {}
    cache_ok = cfg.cache_mb > 0
    bf16 = cfg.precision == "bf16"

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    t0 = time.perf_counter()
    try:
        for step in range(start_step, cfg.steps):
            if before_step is not None:
                before_step(step, student)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            total = 0.0
            for a in range(cfg.accumulate):
                idx = micro_order(step * cfg.accumulate + a, len(data), cfg.seed)
                batch = data[idx]
                tgt = cache.get(idx)
                if tgt is None:
                    with torch.no_grad(), autocast():
                        tgt = run_teacher(batch, need_hidden, need_layers).detach()
                    if cache_ok:
                        if tgt.nbytes() * len(data) <= cfg.cache_mb * 2**20:
                            cache[idx] = tgt
                        else:
                            cache_ok = False
                with autocast():
                    out = model_targets(student, family, batch, need_hidden=need_hidden, need_layers=need_layers)
                loss = out.output.new_zeros((), dtype=torch.float32)
                if cfg.output_weight:
                    loss = loss + cfg.output_weight * output_loss(out, tgt, cfg.temperature)
                if need_hidden:
                    loss = loss + cfg.hidden_weight * norm_mse(out.hidden, tgt.hidden, out.mask)
                if need_layers:
                    loss = loss + cfg.layers_weight * layer_loss(out, tgt, layer_map)
                (loss / cfg.accumulate).backward()
                total += float(loss.detach()) / cfg.accumulate
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step(step, student)
            curve.append((step + 1, total))
            if hasattr(ctx, "metrics"):
                ctx.metrics["running_loss"] = total
            ctx.step("distill", step + 1, cfg.steps)
            if state_path is not None and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                state_path.parent.mkdir(parents=True, exist_ok=True)
                _save_state(
                    state_path,
                    {
                        "fingerprint": fingerprint,
                        "step": step + 1,
                        "curve": curve,
                        "student": student.state_dict(),
                        "optimizer": opt.state_dict(),
                        "rng": torch.get_rng_state(),
                    },
                )
    finally:
        for p in student.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
        student.train(student_mode)
        if teacher_mode is not None:
            teacher.train(teacher_mode)
    if state_path is not None:  # finished: the state is no longer needed
        state_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            state_path.parent.rmdir()  # only when empty

    every = max(1, math.ceil(len(curve) / CURVE_POINTS))
    kept = [(s, round(v, 6)) for s, v in curve[::every]]
    if curve and kept[-1][0] != curve[-1][0]:
        kept.append((curve[-1][0], round(curve[-1][1], 6)))
    what: str = "predicate" if trainable is not None else cfg.trainable
    if cfg.train_layers is not None:
        what += f" in layers {cfg.train_layers}"
    if bf16:
        what += " (bf16 autocast)"
    result = DistillResult(
        steps=cfg.steps,
        seconds=round(time.perf_counter() - t0, 3),
        loss_first=round(curve[0][1], 6) if curve else 0.0,
        loss_last=round(curve[-1][1], 6) if curve else 0.0,
        loss_curve=kept,
        trainable_params=n_train,
        trained=what,
        epochs=round(epochs, 3),
        batches=len(data),
        teacher_cached=bool(cache) and cache_ok,
        resumed_from=resumed,
    )
    if hasattr(ctx, "metrics"):
        ctx.metrics.pop("running_loss", None)
        ctx.metrics["distill"] = result.model_dump(mode="json")
    return result
