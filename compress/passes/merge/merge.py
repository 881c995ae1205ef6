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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from pydantic import ConfigDict, Field, field_validator, model_validator
from torch import nn
from transformers.utils import ModelOutput

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family, build_from_config, family_for
from squeeze.compress.passes.base import Edit, MultiModelConfig, Pass, PassConfig, PassContext, PassResult
from squeeze.compress.passes.merge.compat import check_compatible, check_models, embeddings_identical

log = logging.getLogger(__name__)

HEADLESS_NOTE = "the experts have no head: the merge averages their hidden states (last_hidden_state), not logits"


# --------------------------------------------------------------------------------------------
# The merged model
# --------------------------------------------------------------------------------------------


@dataclass
class MergedOutput(ModelOutput):
    """What a merged model returns: the weighted mean of the experts' outputs.

    ``cache`` is a tuple with one KV cache per expert (None without a cache); transformers 5
    calls it ``cache`` (``past_key_values`` is its deprecated alias).
    """

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    cache: tuple | None = None


class MergedModel(nn.Module):
    """Several experts behind one forward that returns the weighted mean of their outputs.

    Args:
        experts: models of one family whose outputs have the same shape.
        weights: one non-negative weight per expert (normalised here to sum to 1).
        output: ``"logits"`` or ``"last_hidden_state"``, what is averaged.
    """

    #: run_pass refuses single-model passes on a merged model (they would touch expert 0 only)
    is_merged = True

    def __init__(self, experts: list[nn.Module], weights: list[float], output: str = "logits"):
        super().__init__()
        if len(experts) != len(weights):
            raise ValueError(f"{len(experts)} experts but {len(weights)} weights")
        self.experts = nn.ModuleList(experts)
        # Python floats, not a buffer: nothing beyond the experts lands in the state dict, and
        # the export folds them into constants.
        self.merge_weights = normalize(weights)
        self.output = output

    # HF-like facts the rest of squeeze reads (describe, evaluate, export, families).
    @property
    def config(self):
        return self.experts[0].config

    @property
    def family(self) -> Family:
        return family_for(self.config.model_type)

    @property
    def base_model(self) -> nn.Module:
        """The first expert's base transformer, so ``family.layers(merged)`` works."""
        return self.family.base(self.experts[0])

    @property
    def generation_config(self):
        return getattr(self.experts[0], "generation_config", None)

    @property
    def main_input_name(self) -> str:
        return getattr(self.experts[0], "main_input_name", "input_ids")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, *args, cache=None, past_key_values=None, return_dict: bool = True, **kwargs) -> MergedOutput:
        """Run every expert on the same inputs; return the weighted mean of their outputs.

        Takes what an expert takes. ``cache`` (or its old name ``past_key_values``), when given,
        is one cache per expert, as returned in :class:`MergedOutput`.
        """
        cache = cache if cache is not None else past_key_values
        outs = []
        for i, expert in enumerate(self.experts):
            kw = dict(kwargs)
            if cache is not None:
                kw["cache"] = cache[i]
            outs.append(expert(*args, return_dict=True, **kw))
        result: dict[str, Any] = {}
        names = ["logits"] if self.output == "logits" else ["last_hidden_state", "pooler_output"]
        for name in names:
            values = [v for v in (getattr(o, name, None) for o in outs) if v is not None]
            if len(values) < len(outs):
                continue
            acc = self.merge_weights[0] * values[0]
            for w, v in zip(self.merge_weights[1:], values[1:]):
                acc = acc + w * v
            result[name] = acc
        caches = tuple(o.get("cache") for o in outs)
        if any(c is not None for c in caches):
            result["cache"] = caches
        return MergedOutput(**result)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        use_cache: bool = True,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        do_sample: bool = False,
    ) -> torch.Tensor:
        """Greedy decoding on the averaged logits; each expert keeps its own KV cache.

        Returns the prompt followed by the new tokens, ``(B, T + new)``, like transformers'
        ``generate``: rows that reached an end-of-sequence token are padded with ``pad_token_id``
        and decoding stops when every row has finished. Positions follow the attention mask, so
        left-padded prompts decode as they do in transformers.
        """
        if not self.family.causal:
            raise SqueezeError(f"generate needs decoder experts; {self.family.name} is an encoder")
        if self.output != "logits":
            raise SqueezeError("generate needs experts with a language-model head")
        if do_sample:
            raise SqueezeError("the merged model decodes greedily only (do_sample=False)")
        gen = self.generation_config
        if eos_token_id is None:
            eos_token_id = getattr(gen, "eos_token_id", None)
            if eos_token_id is None:
                eos_token_id = self.config.eos_token_id
        eos = torch.tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long).reshape(-1)
        if pad_token_id is None:
            pad_token_id = getattr(gen, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = int(eos[0]) if len(eos) else 0
        ids = input_ids
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        caches = None
        for _ in range(max_new_tokens):
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # (B, T), as transformers
            if caches is None:
                out = self(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache)
            else:
                out = self(
                    input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos[:, -1:], cache=caches, use_cache=True
                )
            caches = out.cache if use_cache else None
            nxt = out.logits[:, -1].argmax(-1)  # (B,)
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            finished |= torch.isin(nxt, eos.to(nxt.device))
            if bool(finished.all()):
                break
        return ids


def normalize(weights: list[float]) -> list[float]:
    total = float(sum(weights))
    return [float(w) / total for w in weights]


# --------------------------------------------------------------------------------------------
# Rebuilding experts from the manifest
# --------------------------------------------------------------------------------------------


def _expert_record(model: nn.Module, ckpt) -> dict[str, Any]:
    """What ``restructure`` needs to rebuild one expert with no data."""
    if ckpt is not None:
        base = ckpt.manifest.base
        return {
            "model_type": base.model_type,
            "architecture": base.architecture,
            "config": base.config,
            "sha256": base.sha256,
            "source": base.source,
            "edits": list(ckpt.manifest.edits),
        }
    config: Any = model.config  # a transformers config
    record = {
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "config": config.to_dict(),
        "sha256": None,
        "source": None,
        "edits": [],
    }
    # Without its checkpoint we only know the config: make sure that is enough to rebuild it.
    rebuilt = build_expert(record)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        raise SqueezeError(
            f"a {type(model).__name__} expert carries changes its config does not describe (squeeze edits?); "
            "merge checkpoints through run_pass / the CLI so their manifests are recorded"
        )
    return record


def build_expert(
    record: dict[str, Any], replay: Callable[[nn.Module, dict, Family], nn.Module] | None = None
) -> nn.Module:
    """An expert's architecture from its record: base config, then its own edits replayed (with
    ``replay``, ``passes.replay_edit``, which hands itself to the pass as ``Pass.replay``)."""
    from transformers import AutoConfig

    family = family_for(record["model_type"])
    cfg = dict(record["config"])
    cfg.pop("model_type", None)
    config = AutoConfig.for_model(record["model_type"], **cfg)
    config.architectures = [record["architecture"]]
    model = build_from_config(family, config)
    edits = record.get("edits", [])
    if edits and replay is None:
        raise SqueezeError(
            "an expert with its own edits needs the manifest replay (load through squeeze.compress.load)"
        )
    for raw in edits:
        assert replay is not None  # checked above
        model = replay(model, raw, family)
    return model.eval()


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
        records = [_expert_record(m, ckpts[i] if ckpts else None) for i, m in enumerate(models)][1:]
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
