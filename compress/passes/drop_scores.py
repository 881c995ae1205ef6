"""Scoring for ``prune`` (LLM-Drop): per-layer similarity of the residual stream, layer by layer.

``S = mean over real tokens of cos(X, Y)`` in fp32. A forward with every layer swapped for a
catcher records the stream entering layer 0 and each layer's other arguments (masks, rotary
tables; sliding-window models have one mask per layer type); then each layer runs over all
calibration batches and its outputs feed the next, so memory holds one layer's activations for
the calibration set (plus ``span`` more for consecutive block scores), never the network's.
"""

from __future__ import annotations

import collections
import math

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.compress.calibration import Batch, model_inputs
from squeeze.compress.families import Family
from squeeze.compress.passes.base import ProgressFn


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for one layer: records its call and passes the hidden states on unchanged."""

    def __init__(self, calls: list, last: bool):
        super().__init__()
        self.calls, self.last = calls, last

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.last:
            raise _Stop
        return args[0]


def _capture(model: nn.Module, family: Family, batches: list[Batch]) -> list[list[tuple[tuple, dict]]]:
    """``calls[i][b] = (args, kwargs)`` of layer i on batch b; ``calls[0][b][0][0]`` is the
    stream entering layer 0. Layers i > 0 reuse their own masks (sliding-window models have
    one per layer type) with the stream computed layer by layer."""
    layers = family.layers(model)
    original = list(layers)
    calls: list[list] = [[] for _ in original]
    try:
        for i in range(len(layers)):
            layers[i] = _Catcher(calls[i], last=i == len(original) - 1)
        for batch in batches:
            kwargs = dict(model_inputs(batch))
            if family.causal:
                kwargs["use_cache"] = False
            try:
                model(**kwargs)
            except _Stop:
                pass
    finally:
        for i, layer in enumerate(original):
            layers[i] = layer
    return calls


def _cos_sum(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    """Sum and count of per-token cosines (fp32) over real tokens. x, y: (B, T, C)."""
    c = F.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
    if mask is not None and mask.shape == c.shape:
        c = c[mask.bool()]
    return float(c.double().sum()), c.numel()


@torch.no_grad()
def layer_scores(model: nn.Module, family: Family, batches: list[Batch], *, span: int = 0,
                 progress: ProgressFn | None = None, label: str = "scoring layers") -> dict[str, list[float]]:
    """Per-layer similarity scores of ``model`` on ``batches``.

    Returns ``attn``, ``mlp`` and ``block`` (length L); with ``span = n > 0`` also ``span``:
    ``cos(h_i, h_{i+n})`` for i in 0..L-n. Skipped sublayers score ``-inf``.
    """
    model.eval()
    layers = family.layers(model)
    n_layers = len(layers)
    calls = _capture(model, family, batches)
    hs = [c[0][0] for c in calls[0]]  # (B, T, C) per batch: the stream entering layer 0
    masks = [b.get("attention_mask") for b in batches]
    out: dict[str, list[float]] = {"attn": [], "mlp": [], "block": []}
    if span:
        out["span"] = []
        history: collections.deque = collections.deque(maxlen=span)
    for i, layer in enumerate(layers):
        if span:
            history.append(list(hs))
        sums = {"attn": [0.0, 0], "mlp": [0.0, 0], "block": [0.0, 0], "span": [0.0, 0]}
        mid: list[torch.Tensor] = []
        handle = family.residual_tap(layer).register_forward_pre_hook(lambda m, a: mid.append(a[0]))
        try:
            for b, h in enumerate(hs):
                args, kwargs = calls[i][b]
                mid.clear()
                y = layer(h, *args[1:], **kwargs)
                y = y[0] if isinstance(y, tuple) else y
                for key, (x, z) in (("attn", (h, mid[0])), ("mlp", (mid[0], y)), ("block", (h, y))):
                    s, n = _cos_sum(x, z, masks[b])
                    sums[key][0] += s
                    sums[key][1] += n
                if span and len(history) == span:
                    s, n = _cos_sum(history[0][b], y, masks[b])
                    sums["span"][0] += s
                    sums["span"][1] += n
                hs[b] = y
        finally:
            handle.remove()
        for key in ("attn", "mlp", "block"):
            out[key].append(sums[key][0] / max(sums[key][1], 1))
        if span and len(history) == span:
            out["span"].append(sums["span"][0] / max(sums["span"][1], 1))
        for key, role in (("attn", "attn"), ("mlp", "mlp")):
            if family.is_skipped(layer, role):
                out[key][-1] = -math.inf
        if progress is not None:
            progress(label, i + 1, n_layers)
    return out


def top_k(scores: list[float], k: int, exclude: set[int] = frozenset()) -> list[int]:
    """Indices of the k highest scores (ties: lower index first), skipping ``exclude``."""
    order = sorted((i for i in range(len(scores)) if i not in exclude and scores[i] != -math.inf),
                   key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def rank_joint(s_attn: list[float], s_mlp: list[float], k: int) -> tuple[list[int], list[int]]:
    """LLM-Drop's joint ranking: one list of 2L scores; an index >= L is MLP layer index - L."""
    n = len(s_attn)
    picked = top_k(list(s_attn) + list(s_mlp), k)
    return [i for i in picked if i < n], [i - n for i in picked if i >= n]
