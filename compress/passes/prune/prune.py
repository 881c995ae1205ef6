"""``prune``: drop attention sublayers, MLP sublayers or whole blocks (LLM-Drop).

"What Matters in Transformers? Not All Attention is Needed" (He, Sun, Shen, Li; arXiv
2406.15786), as its code does it (``layer_drop.py``, ``block_drop.py``):

* **Score.** ``S = mean over real tokens of cos(X, Y)`` in fp32, from the *unpruned* model, on
  calibration data (packed text for decoders). Attention: ``X = h`` (the residual stream
  entering the layer), ``Y = h'`` (after the attention residual add). MLP: ``X = h'``,
  ``Y = h_out``. Block: ``X = h``, ``Y = h_out``. For post-LN BERT, ``h'`` and ``h_out`` are the
  LayerNorm'd outputs of the two sublayer blocks. The highest ``S`` (the sublayer that changes
  the stream least) is dropped first.
* **Layer by layer** (``drop_scores.py``). A forward with every layer swapped for a catcher records the inputs of
  layer 0 and every layer's other arguments (masks, rotary tables); then each layer runs over
  all calibration batches and its outputs feed the next, so memory holds one layer's
  activations for the calibration set, never the whole network's.
* **Modes.** ``drop_attn``, ``drop_mlp``, ``drop_blocks`` (``consecutive``: the n adjacent blocks
  i..i+n-1 with the highest ``cos(h_i, h_{i+n})``, ShortGPT style; the LLM-Drop code ranks by
  ``h_{i+n+1}``, an off-by-one we do not copy), ``drop_joint`` (attention and MLP scores ranked
  in one list of 2L, no per-type normalisation), and ``iterative`` (re-score the partly pruned
  model after each single drop; dropped sublayers score -inf). ``attn_layers`` /
  ``mlp_layers`` / ``block_layers`` drop explicit indices with no scoring. A float amount is a
  share of the layers, rounded half up (``0.5`` of 6 is 3); an int is a count.
* **What a drop is.** Pre-norm families (ViT, Llama, GPT-2) lose the sublayer *and its norm*:
  ``h_out = h_in`` exactly. Post-LN BERT computes ``LN(h + f(h))``; a dropped sublayer either
  passes ``h`` through or keeps its LayerNorm (``LN(h)``). ``keep_norm`` defaults to
  :data:`POST_LN_KEEP_NORM`, chosen by measured fidelity on all-MiniLM-L6-v2
  (``benchmarks/bench_prune.py``; cosine of the mean-pooled embedding against the original on
  the 100 held-apart built-in sentences, one-shot ranking)::

      dropped          keep_norm=True (mean / worst)   keep_norm=False (mean / worst)
      attention x1     0.9654 / 0.8911                 0.9443 / 0.8658
      attention x2     0.9152 / 0.6817                 0.8849 / 0.6814
      attention x3     0.8537 / 0.6203                 0.7843 / 0.5708
      attention x6     0.4990 / 0.2800                 0.3121 / 0.0983
      MLP x1           0.9542 / 0.8693                 0.8851 / 0.7309
      MLP x3           0.8042 / 0.6648                 0.4886 / 0.2957

  Keeping the norm wins at every count (all nine are in the benchmark results): the next layer
  was trained on the output of *this* layer's LayerNorm (its gain and bias), not on the
  previous layer's.
* **Whole blocks** are removed with ``family.remove_layers``: the result is plain Hugging Face
  (``config.json`` has the new ``num_hidden_layers``) and loads with transformers alone.
* **Decoders.** Kept attention layers get dense KV-cache slots, and every cache the model uses
  holds exactly those slots (``kv_cache.compact_kv_cache``), so ``generate(use_cache=True)``
  gives the tokens of ``use_cache=False``. Dropping every attention layer of a decoder is
  refused (nothing would mix tokens, and the cache would have no slot to count positions).

Manifest edit ``result``: ``num_layers``, ``attention`` / ``mlp`` / ``blocks`` (index lists in
the original numbering; ``restructure`` also accepts length-L boolean masks, as LLM-Drop's
config does), ``keep_norm`` (BERT), ``scores`` (``attn``, ``mlp``, ``block`` per layer, from the
unpruned model) and, when iterative, ``rounds``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar, cast

from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family
from squeeze.compress.passes.base import Edit, Pass, PassConfig, PassContext, PassResult
from squeeze.compress.passes.prune.config import (
    AMOUNTS,
    POST_LN_KEEP_NORM,
    Plan,
    PruneConfig,
    PruneResult,
    count_of,
    to_indices,
)
from squeeze.compress.passes.prune.kv_cache import compact_kv_cache
from squeeze.compress.passes.prune.scores import layer_scores, rank_joint, top_k

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


class PrunePass(Pass):
    """Attention / MLP / block / joint dropping by residual-stream similarity (LLM-Drop)."""

    name: ClassVar[str] = "prune"
    Config: ClassVar[type[PassConfig]] = PruneConfig
    Result: ClassVar[type[PassResult]] = PruneResult
    needs_calibration: ClassVar[bool] = True
    config: PruneConfig

    # ---------------- checks ----------------

    def keep_norm(self, family: Family) -> bool | None:
        """The keep_norm this run uses: None for pre-norm families."""
        if family.norm_placement != "post":
            return None
        return POST_LN_KEEP_NORM if self.config.keep_norm is None else self.config.keep_norm

    def check(self, family: Family, models: list[nn.Module] | None = None) -> None:
        cfg = self.config
        if cfg.keep_norm is not None and family.norm_placement != "post":
            kind = "decoder" if family.causal else "encoder"
            raise SqueezeError(
                f"keep_norm is an option of post-LN encoders (bert) only; {family.name} is a pre-norm {kind}, "
                "where a dropped sublayer always takes its norm with it"
            )
        if not models:
            return
        if cfg.mode == "block" or cfg.block_layers is not None:
            if family.layer_scaled_attention(models[0].config):
                raise SqueezeError(
                    f"{family.name} with scale_attn_by_inverse_layer_idx scales attention by layer index: "
                    "removing blocks would change the kept layers; drop attention or MLP sublayers instead"
                )
        self._counts(family, models[0])

    def _counts(self, family: Family, model: nn.Module) -> dict[str, Any]:
        """Validated counts (scored modes) or index lists (explicit), before any work.

        Counts are of the layers the model has; sublayers an earlier step dropped are not
        candidates again, so asking for more than remain is an error.
        """
        cfg = self.config
        layers = family.layers(model)
        n = len(layers)
        gone = {w: {i for i, layer in enumerate(layers) if family.is_skipped(layer, w)} for w in ("attn", "mlp")}
        if cfg.mode == "explicit":
            att = to_indices(cfg.attn_layers, n, "attn_layers")
            mlp = to_indices(cfg.mlp_layers, n, "mlp_layers")
            blocks = to_indices(cfg.block_layers, n, "block_layers")
            self._refuse_empty(family, n, len(gone["attn"] | set(att)), len(blocks))
            return {"attention": att, "mlp": mlp, "blocks": blocks}
        what = {"attn": "attention sublayers", "mlp": "MLP sublayers", "block": "blocks", "joint": "sublayers"}[
            cfg.mode
        ]
        total = 2 * n if cfg.mode == "joint" else n
        k = count_of(getattr(cfg, AMOUNTS[("attn", "mlp", "block", "joint").index(cfg.mode)]), total, what)
        left = {
            "attn": n - len(gone["attn"]),
            "mlp": n - len(gone["mlp"]),
            "block": n,
            "joint": 2 * n - len(gone["attn"]) - len(gone["mlp"]),
        }[cfg.mode]
        if k > left:
            raise SqueezeError(f"cannot drop {k} {what}: only {left} remain (an earlier step dropped the others)")
        self._refuse_empty(
            family, n, len(gone["attn"]) + (k if cfg.mode == "attn" else 0), k if cfg.mode == "block" else 0
        )
        return {"k": k, "gone_attn": gone["attn"]}

    @staticmethod
    def _refuse_empty(family: Family, n: int, n_attn: int, n_blocks: int) -> None:
        """At least one block must remain, and a decoder keeps at least one attention layer."""
        if n_blocks >= n:
            raise SqueezeError(f"cannot drop all {n} blocks: at least one must remain")
        if family.causal and n_attn >= n:
            raise SqueezeError(
                f"cannot drop all {n} attention layers of a decoder: nothing would mix tokens, "
                "and the KV cache would have no slot"
            )

    # ---------------- planning ----------------

    def plan(self, model: nn.Module, ctx: PassContext, *, inplace: bool = False) -> Plan:
        """Score and decide (no structural change unless iterative and ``inplace``)."""
        family, cfg = ctx.family, self.config
        n = family.num_layers(model)
        counts = self._counts(family, model)
        keep_norm = self.keep_norm(family)
        if cfg.mode == "explicit":
            return Plan(num_layers=n, keep_norm=keep_norm, **counts)
        k = counts["k"]
        batches = ctx.calib_batches()
        span = k if cfg.consecutive and k > 0 else 0
        scores = layer_scores(model, family, batches, span=span, progress=ctx.step)
        plan = Plan(num_layers=n, keep_norm=keep_norm, scores=scores)
        if k == 0:
            return plan
        if cfg.iterative:
            work = model if inplace else copy.deepcopy(model)
            self._iterate(work, ctx, plan, k, scores)
        elif cfg.mode == "attn":
            plan.attention = top_k(scores["attn"], k)
        elif cfg.mode == "mlp":
            plan.mlp = top_k(scores["mlp"], k)
        elif cfg.mode == "block" and cfg.consecutive:
            start = top_k(scores["span"], 1)[0]  # the window i..i+k-1 whose ends are most alike
            plan.blocks = list(range(start, start + k))
        elif cfg.mode == "block":
            plan.blocks = top_k(scores["block"], k)
        else:
            plan.attention, plan.mlp = rank_joint(scores["attn"], scores["mlp"], k)
        # a joint drop may take every attention layer
        self._refuse_empty(family, n, len(counts["gone_attn"] | set(plan.attention)), 0)
        return plan

    def _iterate(self, work: nn.Module, ctx: PassContext, plan: Plan, k: int, scores: dict) -> None:
        """Drop one sublayer (or block) at a time, re-scoring the partly pruned model."""
        family, mode = ctx.family, self.config.mode
        layers = family.layers(work)
        for r in range(k):
            if r > 0:
                scores = layer_scores(
                    work, family, ctx.calib_batches(), progress=ctx.step, label=f"re-scoring (round {r + 1}/{k})"
                )
            if mode == "joint":
                att, mlp = rank_joint(scores["attn"], scores["mlp"], 1)
                kind, idx = ("attn", att[0]) if att else ("mlp", mlp[0])
            elif mode == "block":
                kind, idx = "block", top_k(scores["block"], 1, exclude=set(plan.blocks))[0]
            else:
                kind, idx = mode, top_k(scores[mode], 1)[0]
            score = scores["block" if kind == "block" else kind][idx]
            plan.rounds.append({"kind": kind, "layer": idx, "S": round(float(score), 6)})
            log.info("round %d: drop %s %d (S=%.6f)", r + 1, kind, idx, score)
            if kind == "block":
                plan.blocks.append(idx)
                for which in ("attn", "mlp"):  # an identity block while re-scoring; removed at the end
                    if not family.is_skipped(layers[idx], which):
                        family.skip_sublayer(layers[idx], which, False)
            else:
                (plan.attention if kind == "attn" else plan.mlp).append(idx)
                family.skip_sublayer(layers[idx], kind, bool(plan.keep_norm))
        plan.attention.sort()
        plan.mlp.sort()
        plan.blocks.sort()

    # ---------------- applying and replaying ----------------

    @staticmethod
    def apply_plan(model: nn.Module, plan: Plan, family: Family) -> nn.Module:
        """Make the structural change a plan describes (skips sublayers already skipped)."""
        layers = family.layers(model)
        for which, idx in (("attn", plan.attention), ("mlp", plan.mlp)):
            for i in idx:
                if not family.is_skipped(layers[i], which):
                    family.skip_sublayer(layers[i], which, bool(plan.keep_norm))
        if plan.blocks:
            family.remove_layers(model, plan.blocks)
        if family.causal:
            compact_kv_cache(family, model)
        return model

    def preview(self, models: list[nn.Module], ctx: PassContext) -> dict[str, Any]:
        """The scores and what would be dropped (``--dry-run``); the model is not changed."""
        return self.plan(models[0], ctx).result()

    def apply(self, models: list[nn.Module], ctx: PassContext) -> nn.Module:
        model = models[0].eval()  # run_pass hands the pass a copy: the input checkpoint stays untouched
        plan = self.plan(model, ctx, inplace=True)
        self.apply_plan(model, plan, ctx.family)
        result = PruneResult(**plan.result())
        ctx.result = result
        ctx.metrics.update(
            {
                "dropped": {"attention": plan.attention, "mlp": plan.mlp, "blocks": plan.blocks},
                "scores": result.scores,
                "keep_norm": plan.keep_norm,
            }
        )
        if plan.rounds:
            ctx.metrics["rounds"] = plan.rounds
        if plan.scores is not None and not (plan.attention or plan.mlp or plan.blocks):
            ctx.warn("nothing dropped: the amount rounds to 0 layers")
        return model

    def restructure(self, model: nn.Module, edit: Edit, family: Family) -> nn.Module:
        res = cast(PruneResult, self.result_of(edit))
        n = family.num_layers(model)
        if res.num_layers is not None and res.num_layers != n:
            raise SqueezeError(f"prune edit was made on {res.num_layers} layers, the model has {n}")
        plan = Plan(
            num_layers=n,
            attention=to_indices(res.attention, n, "attention"),
            mlp=to_indices(res.mlp, n, "mlp"),
            blocks=to_indices(res.blocks, n, "blocks"),
            keep_norm=res.keep_norm,
        )
        return self.apply_plan(model, plan, family)
