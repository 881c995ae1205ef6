"""Scoring for ``prune`` (LLM-Drop): per-layer similarity of the residual stream, layer by layer.

``S = mean over real tokens of cos(X, Y)`` in fp32, walking the layers with
:class:`~squeeze.compress.capture.Layerwise` (each layer runs once over all calibration batches
and its outputs feed the next), so memory holds one layer's activations for the calibration set
(plus ``span`` more for consecutive block scores), never the network's.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Set

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.compress.capture import Batch, Layerwise
from squeeze.compress.families import Family

ProgressFn = Callable[[str, int, int], None]


def _cos_sum(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    """Sum and count of per-token cosines (fp32) over real tokens. x, y: (B, T, C)."""
    c = F.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
    if mask is not None and mask.shape == c.shape:
        c = c[mask.bool()]
    return float(c.double().sum()), c.numel()


@torch.no_grad()
def layer_scores(
    model: nn.Module,
    family: Family,
    batches: list[Batch],
    *,
    span: int = 0,
    progress: ProgressFn | None = None,
    label: str = "scoring layers",
) -> dict[str, list[float]]:
    """Per-layer similarity scores of ``model`` on ``batches``.

    Returns ``attn``, ``mlp`` and ``block`` (length L); with ``span = n > 0`` also ``span``:
    ``cos(h_i, h_{i+n})`` for i in 0..L-n. Skipped sublayers score ``-inf``.
    """
    model.eval()
    walk = Layerwise(model, family, batches)
    n_layers = len(walk)
    masks = walk.masks
    out: dict[str, list[float]] = {"attn": [], "mlp": [], "block": []}
    if span:
        out["span"] = []
        history: collections.deque = collections.deque(maxlen=span)
    for i in walk:
        layer, hs = walk.layer, walk.inputs
        if span:
            history.append(list(hs))
        sums = {"attn": [0.0, 0], "mlp": [0.0, 0], "block": [0.0, 0], "span": [0.0, 0]}
        mid: list[torch.Tensor] = []
        handle = family.residual_tap(layer).register_forward_pre_hook(lambda m, a, mid=mid: mid.append(a[0]))
        try:
            ys = walk.run()
        finally:
            handle.remove()
        for b, (h, y) in enumerate(zip(hs, ys, strict=True)):
            for key, (x, z) in (("attn", (h, mid[b])), ("mlp", (mid[b], y)), ("block", (h, y))):
                s, n = _cos_sum(x, z, masks[b])
                sums[key][0] += s
                sums[key][1] += n
            if span and len(history) == span:
                s, n = _cos_sum(history[0][b], y, masks[b])
                sums["span"][0] += s
                sums["span"][1] += n
        walk.keep(ys)
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


def top_k(scores: list[float], k: int, exclude: Set[int] = frozenset()) -> list[int]:
    """Indices of the k highest scores (ties: lower index first), skipping ``exclude``."""
    order = sorted(
        (i for i in range(len(scores)) if i not in exclude and scores[i] != -math.inf), key=lambda i: (-scores[i], i)
    )
    return sorted(order[:k])


def rank_joint(s_attn: list[float], s_mlp: list[float], k: int) -> tuple[list[int], list[int]]:
    """LLM-Drop's joint ranking: one list of 2L scores; an index >= L is MLP layer index - L."""
    n = len(s_attn)
    picked = top_k(list(s_attn) + list(s_mlp), k)
    return [i for i in picked if i < n], [i - n for i in picked if i >= n]
