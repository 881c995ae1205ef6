"""Logit-averaging merge of several models (Growing Transformers; Bochkov, arXiv 2507.07129, §3.1).

The merged model runs every expert on the same input and returns the weighted mean of their
logits: ``logits = sum_i w_i * logits_i`` with ``w`` normalised to sum to 1 (equal by default).
There is no router and no parameter beyond the experts'. For models without a head (an
embedding model) the merge averages what the family exposes instead, ``last_hidden_state``
(and ``pooler_output`` when every expert has one), and the ledger says so.

Compatibility is checked before anything is written (``merge_compat``): same family, same kind
of output (logits or hidden states), same output shape (vocabulary size, number and names of
labels, hidden size, image and patch size), and, where the checkpoints are known (``run_pass``
sets ``ctx.inputs``), the same tokenizer (vocabulary map, special tokens, and the ids of sample
text) or the same image processor config. Experts may differ in depth or width: only their
outputs must line up.

Saved form: the merged folder's ``model.safetensors`` holds every expert (keys ``experts.<i>.``);
the base in the manifest is the first expert, and the edit's result holds, for every other expert,
its base config, architecture and its own squeeze edits, so ``restructure`` rebuilds the wrapper
with no data and the state dict then loads strictly.

Decoders: :meth:`MergedModel.generate` is a greedy loop in which each expert keeps its own KV
cache (the paper's advice); it gives the same tokens with and without the cache.

Passes applied *after* a merge see the first expert only (``family.layers`` of the wrapper is the
first expert's); compress the experts before merging them.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar, cast

import torch
from pydantic import ConfigDict, Field, field_validator, model_validator
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family
from squeeze.compress.passes.base import Edit, MultiModelConfig, Pass, PassConfig, PassContext, PassResult
from squeeze.compress.passes.merge.compat import check_compatible, check_models, embeddings_identical
from squeeze.compress.passes.merge.model import MergedModel, build_expert, expert_record, normalize

log = logging.getLogger(__name__)

HEADLESS_NOTE = "the experts have no head: the merge averages their hidden states (last_hidden_state), not logits"


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


class MergeConfig(MultiModelConfig):
    """``merge``: average the logits of this model and the ``others``.

    Recipe form: ``- merge: {others: [B, C], weights: [0.5, 0.25, 0.25]}`` (``with:`` is still
    read); ``run.apply`` loads each reference and passes the checkpoints after the job's model,
    in order.
    """

    weights: list[float] | None = Field(
        None, description="one weight per expert, this model first (default: equal); normalised to sum 1"
    )

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError("give one weight per expert (at least two)")
        if any(not (w >= 0) or w == float("inf") for w in v):
            raise ValueError(f"weights must be finite and non-negative, got {v}")
        if sum(v) <= 0:
            raise ValueError("weights must not all be zero")
        return v

    @model_validator(mode="after")
    def _check_counts(self) -> MergeConfig:
        if self.others and self.weights is not None and len(self.weights) != len(self.others) + 1:
            raise ValueError(
                f"{len(self.weights)} weights for {len(self.others) + 1} experts (this model and {len(self.others)} others)"
            )
        return self


class MergeResult(PassResult):
    """The manifest result of ``merge``: normalised weights, what is averaged, and for every expert
    after the first its base config, architecture and own squeeze edits (what replay rebuilds)."""

    model_config = ConfigDict(extra="forbid")

    weights: list[float]
    output: str = "logits"
    experts: list[dict[str, Any]] = Field(default_factory=list)

    def summary(self) -> list[str]:
        return [
            f"merged {len(self.weights)} experts, weights {', '.join(f'{w:.4g}' for w in self.weights)}, "
            f"averaging {self.output}"
        ]


class MergePass(Pass):
    """Logit-averaging merge: one model whose output is the weighted mean of the experts'."""

    name: ClassVar[str] = "merge"
    Config: ClassVar[type[PassConfig]] = MergeConfig
    Result: ClassVar[type[PassResult]] = MergeResult
    multi_model: ClassVar[bool] = True
    wraps_models: ClassVar[bool] = True

    def _weights(self, n: int) -> list[float]:
        cfg = cast(MergeConfig, self.config)
        if cfg.others and len(cfg.others) + 1 != n:
            raise SqueezeError(f"merge: {len(cfg.others)} other models configured but {n - 1} given")
        if cfg.weights is None:
            return [1.0 / n] * n
        if len(cfg.weights) != n:
            raise SqueezeError(f"merge: {len(cfg.weights)} weights for {n} models (give one weight per model)")
        return normalize(cfg.weights)

    def check(self, family: Family, models: list[nn.Module] | None = None) -> None:
        models = models or []
        self._weights(len(models))
        check_models(models)

    def check_data(self, ctx: PassContext) -> None:
        """With the checkpoints at hand (``ctx.inputs``): tokenizers / processors too, once, before any work."""
        self._compat = check_compatible(ctx.inputs, warn=ctx.warn) if len(ctx.inputs) > 1 else None

    def apply(self, models: list[nn.Module], ctx: PassContext) -> nn.Module:
        weights = self._weights(len(models))
        inputs = list(getattr(ctx, "inputs", None) or [])
        ckpts = inputs if len(inputs) == len(models) else None  # models are the inputs' copies (run_pass)
        compat = getattr(self, "_compat", None)
        if ckpts and compat is not None:
            family, kind = compat
        elif ckpts:
            family, kind = check_compatible(ckpts, warn=ctx.warn)
        else:
            family, kind = check_models(models)
            ctx.warn("merge got models without their checkpoints: tokenizers were not compared")
        ctx.step("merge", 0, 1)
        for i, j in _identical_pairs(models):
            ctx.warn(f"models {i + 1} and {j + 1} have identical weights: the merge only costs compute")

        experts: list[nn.Module] = []
        for m in models:
            # the same module twice would share storage and save as one expert
            experts.append(copy.deepcopy(m) if any(m is e for e in experts) else m)
        records = [expert_record(m, ckpts[i] if ckpts else None) for i, m in enumerate(models)][1:]
        merged = MergedModel(experts, weights, output=kind).eval()

        ctx.result = MergeResult(weights=merged.merge_weights, output=kind, experts=records)
        ctx.metrics.update(
            {
                "experts": len(models),
                "weights": merged.merge_weights,
                "averaged": kind,
                "params_per_expert": [sum(p.numel() for p in m.parameters()) for m in models],
                "embeddings_identical": embeddings_identical(models, family),
            }
        )
        if kind != "logits":
            ctx.metrics["note"] = HEADLESS_NOTE
            ctx.warn(HEADLESS_NOTE)
        ctx.step("merge", 1, 1)
        return merged

    def restructure(self, model: nn.Module, edit: Edit, family: Family) -> nn.Module:
        res = cast(MergeResult, self.result_of(edit))
        experts = [model, *(build_expert(r, self.replay) for r in res.experts)]
        return MergedModel(experts, res.weights, output=res.output).eval()


LogitMerge = MergePass  # the class's former name


def _identical_pairs(models: list[nn.Module]) -> list[tuple[int, int]]:
    """Index pairs of models whose state dicts are equal (merging a model with itself is allowed, but said)."""
    states = [m.state_dict() for m in models]
    pairs = []
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            a, b = states[i], states[j]
            if a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a):
                pairs.append((i, j))
    return pairs
