"""Decoder export with a KV cache (Optimum's ``text-generation-with-past``), validated by generation.

One graph serves prefill and decode, as Optimum's ``model.onnx`` does::

    inputs   input_ids (batch_size, sequence_length)         int64
             attention_mask (batch_size, past_sequence_length + sequence_length)
             position_ids (batch_size, sequence_length)
             past_key_values.{i}.key / .value (batch_size, kv_heads, past_sequence_length, head_dim)
    outputs  logits (batch_size, sequence_length, vocab)
             present.{i}.key / .value (batch_size, kv_heads, past_sequence_length + sequence_length, head_dim)

The first step feeds zero-length past tensors. ``i`` counts cache slots, not layers: a layer
whose attention was dropped by the prune pass has no slot (the pass renumbers the kept layers'
caches densely, see ``passes/prune/kv_cache.py``), so its tensors are neither fed nor returned. A
merged model carries one cache per expert, numbered expert after expert.

Validation is what deployment does: a greedy loop in ONNX Runtime (positions from the attention
mask, left-padded prompts, the cache fed back) must pick the same tokens as transformers'
``generate`` for ``new_tokens`` steps, and the logits of every step agree within tolerance (or by
the quantized rule, see ``compress/passes/quantize/onnx_check.py``) up to and including the first step
where the tokens part.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from squeeze.compress.calibration import DataSpec, batches
from squeeze.compress.checkpoint import Checkpoint
from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family

WITH_PAST = "text-generation-with-past"
TASKS = ("auto", WITH_PAST, "text-generation", "feature-extraction")
NEW_TOKENS = 32  # what the issue asks of the generation check
# the trace's shapes: all different, so no dynamic axis can be mistaken for another
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 3, 4, 5


def experts(model: nn.Module) -> list[nn.Module]:
    """The models that keep a cache: the experts of a merged model, else the model itself."""
    return list(cast(nn.ModuleList, model.experts)) if getattr(model, "is_merged", False) else [model]


def resolve_task(task: str | None, ckpt: Checkpoint) -> str:
    """``auto``: the cached decoder graph for a causal LM with a head, else today's graph."""
    if task not in (None, *TASKS):
        raise SqueezeError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    fam = ckpt.family
    has_head = all(fam.head_module(m) is not None for m in experts(ckpt.model))
    if task in (None, "auto"):
        return WITH_PAST if fam.causal and has_head else "default"
    if task.startswith("text-generation") and not (fam.causal and has_head):
        raise SqueezeError(
            f"--task {task} needs a causal language model with its head; {fam.name} "
            f"({type(ckpt.model).__name__}) is not one"
        )
    return WITH_PAST if task == WITH_PAST else "default"


def _call(model: nn.Module, caches: list, **kwargs) -> Any:
    cache = tuple(caches) if getattr(model, "is_merged", False) else caches[0]
    return model(**kwargs, cache=cache, use_cache=True, return_dict=True)


def _present(out: Any, n_experts: int) -> list:
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    return list(cache) if n_experts > 1 or isinstance(cache, tuple) else [cache]


@dataclass(frozen=True)
class CacheLayout:
    """Cache slots per expert, each as (kv_heads, key_dim, value_dim)."""

    slots: tuple[tuple[tuple[int, int, int], ...], ...]

    @property
    def flat(self) -> list[tuple[int, int, int]]:
        return [s for e in self.slots for s in e]

    def input_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(len(self.flat)) for kv in ("key", "value")]

    def output_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(len(self.flat)) for kv in ("key", "value")]

    def empty(
        self, batch: int, past: int, dtype: torch.dtype, gen: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        out = []
        for h, dk, dv in self.flat:
            for d in (dk, dv):
                t = (
                    torch.zeros(batch, h, past, d)
                    if gen is None
                    else torch.randn(batch, h, past, d, generator=gen) * 0.5
                )
                out.append(t.to(dtype))
        return out


@torch.no_grad()
def cache_layout(model: nn.Module) -> CacheLayout:
    """Probe the model once with empty caches: how many slots it fills and their shapes."""
    from transformers.cache_utils import DynamicCache

    n = len(experts(model))
    caches = [DynamicCache() for _ in range(n)]
    ids = torch.zeros(1, 2, dtype=torch.long)
    out = _call(model, caches, input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(2)[None])
    slots = []
    for cache in _present(out, n):
        layers = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
        slots.append(tuple((int(c.keys.shape[1]), int(c.keys.shape[3]), int(c.values.shape[3])) for c in layers))
    return CacheLayout(tuple(slots))


class DecoderWithPast(nn.Module):
    """Flat tensors in and out, in Optimum's order (what the ONNX graph sees)."""

    def __init__(self, model: nn.Module, layout: CacheLayout):
        super().__init__()
        self.model = model
        self.layout = layout

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        caches, i = [], 0
        for slots in self.layout.slots:
            cache = DynamicCache()
            for s in range(len(slots)):
                cache.update(past[2 * i], past[2 * i + 1], s)
                i += 1
            caches.append(cache)
        out = _call(self.model, caches, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        present = []
        for cache in _present(out, len(self.layout.slots)):
            for layer in cache.layers:
                if getattr(layer, "keys", None) is not None:
                    present += [layer.keys, layer.values]
        return (out["logits"], *present)


def export_with_past(model: nn.Module, path: Path, *, opset: int, dtype: torch.dtype = torch.float32) -> CacheLayout:
    """Trace ``model`` into ``path`` (TorchScript exporter, dynamic axes as Optimum names them)."""
    from squeeze.kernels.registry import torchscript_symbolics

    layout = cache_layout(model)
    wrapper = DecoderWithPast(model, layout).eval()
    gen = torch.Generator().manual_seed(0)
    b, s, p = _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST
    config: Any = model.config  # a transformers config: its attributes depend on the model
    vocab = Family.vocab_size(config)
    ids = torch.randint(vocab // 4, vocab, (b, s), generator=gen)
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    past = layout.empty(b, p, dtype, gen)
    names = ["input_ids", "attention_mask", "position_ids", *layout.input_names()]
    outputs = ["logits", *layout.output_names()]
    dyn: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    dyn.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in layout.input_names()})
    dyn.update({n: {0: "batch_size", 2: "past_sequence_length + sequence_length"} for n in layout.output_names()})
    with warnings.catch_warnings(), torch.no_grad(), torchscript_symbolics(opset):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (ids, mask, pos, *past),
            str(path),
            input_names=names,
            output_names=outputs,
            dynamic_axes=dyn,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    return layout


# --------------------------------------------------------------------------------------------
# Validation by greedy generation
# --------------------------------------------------------------------------------------------


def prompts(ckpt: Checkpoint, length: int, data: DataSpec | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Two prompts from the family's data, the second half as long and left-padded (what batched
    generation does); returns (input_ids, attention_mask, pad id)."""
    spec = (data or DataSpec()).model_copy(
        update={"samples": 2, "eval_samples": 2, "seq_len": max(length, 4), "batch_size": 2}
    )
    ids = batches(ckpt, spec, split="eval", warn=lambda _m: None)[0]["input_ids"][:2, :length].clone()
    pad = getattr(ckpt.config, "pad_token_id", None)
    pad = int(pad if pad is not None else 0)
    mask = torch.ones_like(ids)
    short = max(1, length // 2)
    ids[1] = torch.cat([torch.full((length - short,), pad), ids[1, :short]])
    mask[1, : length - short] = 0
    return ids, mask, pad


@torch.no_grad()
def torch_greedy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int, pad: int):
    """transformers' ``generate`` (greedy, no early stop): new tokens and each step's logits
    (None for a merged model, whose own ``generate`` returns tokens only)."""
    lm: Any = model  # a transformers generation model, or a merged one: generate / generation_config
    if getattr(model, "is_merged", False):
        out = lm.generate(ids, mask, max_new_tokens=new, eos_token_id=[], pad_token_id=pad)
        return out[:, ids.shape[1] :], None
    from transformers import GenerationConfig

    # generate fills unset fields from the model's own generation config (its end-of-sequence token
    # would stop a row, or with min_new_tokens mask that token's logit): swap in a config without one
    saved = lm.generation_config
    lm.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=new, pad_token_id=pad, output_logits=True, return_dict_in_generate=True
    )
    try:
        out = lm.generate(input_ids=ids, attention_mask=mask)
    finally:
        model.generation_config = saved
    return out.sequences[:, ids.shape[1] :], [x.float() for x in out.logits]


def ort_greedy(session, layout: CacheLayout, ids: np.ndarray, mask: np.ndarray, new: int, dtype: np.dtype):
    """The deployment loop: prefill, then one token at a time with the cache fed back."""
    wanted = {i.name for i in session.get_inputs()}
    out_names = [o.name for o in session.get_outputs()]
    past = dict(
        zip(
            layout.input_names(),
            (t.numpy().astype(dtype) for t in layout.empty(ids.shape[0], 0, torch.float32)),
            strict=False,
        )
    )
    cur, m = ids, mask
    tokens, logits = [], []
    for _ in range(new):
        pos = np.cumsum(m, axis=1) - 1
        pos[m == 0] = 1
        feeds = {"input_ids": cur, "attention_mask": m, "position_ids": pos[:, -cur.shape[1] :], **past}
        res = dict(zip(out_names, session.run(None, {k: v for k, v in feeds.items() if k in wanted}), strict=False))
        last = res["logits"][:, -1].astype(np.float32)
        nxt = last.argmax(-1)
        tokens.append(nxt)
        logits.append(last)
        past = {p: res[o] for p, o in zip(layout.input_names(), layout.output_names(), strict=False)}
        cur = nxt[:, None].astype(np.int64)
        m = np.concatenate([m, np.ones_like(m[:, :1])], axis=1)
    return np.stack(tokens, axis=1), logits


def validate_generation(
    session,
    model: nn.Module,
    layout: CacheLayout,
    ids: torch.Tensor,
    mask: torch.Tensor,
    pad: int,
    *,
    new: int,
    dtype: np.dtype,
    judge,
) -> dict[str, Any]:
    """Greedy tokens of ORT vs ``generate``; ``judge(got, want, what)`` compares step logits and
    returns a check dict with ``ok``. Returns the generation report (``ok``, tokens, ``checks``)."""
    want_tok, want_logits = torch_greedy(model, ids, mask, new, pad)
    start = time.perf_counter()
    got_tok, got_logits = ort_greedy(session, layout, ids.numpy(), mask.numpy(), new, dtype)
    ms = (time.perf_counter() - start) * 1e3 / new
    want_np = want_tok.numpy()
    same = got_tok == want_np
    rows_ok = same.all(axis=1)
    first = int(np.argmin(same.all(axis=0))) if not same.all() else new
    gen = {
        "new_tokens": new,
        "batch": int(ids.shape[0]),
        "prompt_len": int(ids.shape[1]),
        "left_padded_rows": int((mask[:, 0] == 0).sum()),
        "tokens_equal": bool(same.all()),
        "rows_equal": [bool(r) for r in rows_ok],
        "first_mismatch_step": None if same.all() else first,
        "ort_tokens": got_tok.tolist(),
        "reference_tokens": want_np.tolist(),
        "ort_ms_per_token": round(ms, 3),
    }
    checks = []
    if want_logits is not None:  # steps up to and including the first divergence share their inputs
        upto = min(first + 1, new)
        checks.append(
            {
                **judge(got_logits[0], want_logits[0].numpy(), "logits"),
                "shape": f"prefill {ids.shape[0]}x{ids.shape[1]}",
            }
        )
        if upto > 1:
            got = np.stack(got_logits[1:upto], axis=1)
            want = torch.stack(want_logits[1:upto], dim=1).numpy()
            checks.append(
                {
                    **judge(got, want, "logits"),
                    "shape": f"decode {ids.shape[0]}x1, past {ids.shape[1]}..{ids.shape[1] + upto - 2}",
                }
            )
    gen["checks"] = checks
    gen["ok"] = gen["tokens_equal"] and all(c["ok"] for c in checks)
    return gen


def prefill_feed(session, name: str, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """What a KV-cache graph's extra input takes for a plain prefill: positions from the
    attention mask, or an empty past (``squeeze eval graph.onnx`` runs such graphs this way)."""
    ids = batch["input_ids"]
    if name == "position_ids":
        m = batch.get("attention_mask", torch.ones_like(ids)).numpy()
        pos = np.cumsum(m, axis=1) - 1
        pos[m == 0] = 1
        return pos.astype(np.int64)
    spec = next(i for i in session.get_inputs() if i.name == name)
    _, heads, _, dim = spec.shape
    return np.zeros((ids.shape[0], heads, 0, dim), np.float16 if "float16" in spec.type else np.float32)


@torch.no_grad()
def prefill_checks(session, model: nn.Module, inputs: list[dict[str, torch.Tensor]], judge) -> list[dict[str, Any]]:
    """Every position's logits of a prefill (empty past) against the model's own forward, on the
    export's validation batches (two shapes, padding included)."""
    wanted = [i.name for i in session.get_inputs()]
    checks = []
    for batch in inputs:
        feeds = {n: batch[n].numpy() if n in batch else prefill_feed(session, n, batch) for n in wanted}
        got = session.run(["logits"], feeds)[0].astype(np.float32)
        pos = torch.from_numpy(prefill_feed(session, "position_ids", batch))
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=pos,
            use_cache=False,
            return_dict=True,
        )
        shape = "x".join(str(d) for d in batch["input_ids"].shape)
        checks.append({**judge(got, out["logits"].float().numpy(), "logits"), "shape": shape})
    return checks
