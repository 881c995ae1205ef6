"""The merged model: every expert run on the same input, their outputs averaged with fixed weights
(and a greedy ``generate`` keeping one KV cache per expert); the per-expert record a manifest
keeps so that ``restructure`` rebuilds the experts with no data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family, build_from_config, family_for

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


def expert_record(model: nn.Module, ckpt) -> dict[str, Any]:
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
