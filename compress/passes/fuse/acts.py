"""Activations of every weight space's taps, tokens flattened, per neuron.

One forward per calibration batch and model records each tap (a module's output, or its first
input), keeps the real tokens (where the batch has an ``attention_mask``), and returns per tap a
``(neurons, tokens)`` matrix. All tokens count (the reference code's ViT ``window_6`` filter keeps
the centre patches; squeeze keeps every token, evenly thinned to ``max_tokens``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from squeeze.compress.capture import record
from squeeze.compress.families import Family, Space, Tap


def tap_names(spaces: list[Space]) -> dict[str, Tap]:
    """Every tap of every space, keyed ``<space>/<tap>``."""
    return {f"{s.name}/{k}": t for s in spaces for k, t in s.taps.items()}


@torch.no_grad()
def capture(
    model: nn.Module,
    family: Family,
    spaces: list[Space],
    batches: list[dict[str, torch.Tensor]],
    max_tokens: int,
) -> dict[str, torch.Tensor]:
    """``{"<space>/<tap>": (neurons, tokens)}`` for one model over the calibration batches."""
    taps = tap_names(spaces)
    modules = {
        w: {t.module: model.get_submodule(t.module) for t in taps.values() if t.what == w} for w in ("input", "output")
    }
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in taps}
    for batch in batches:
        with record(modules["input"], what="input") as ins, record(modules["output"], what="output") as outs:
            kwargs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
            if family.causal:
                kwargs["use_cache"] = False
            model(**kwargs, return_dict=True)
        mask = batch.get("attention_mask")
        for key, tap in taps.items():
            x = (ins if tap.what == "input" else outs)[tap.module][0]  # (B, T, n)
            x = x[..., tap.start : tap.stop]
            x = x[mask.bool()] if mask is not None and mask.shape == x.shape[:2] else x.reshape(-1, x.shape[-1])
            rows[key].append(x.float())
    out = {}
    for key, parts in rows.items():
        x = torch.cat(parts)  # (tokens, n)
        if len(x) > max_tokens:  # evenly thinned, deterministic
            x = x[torch.linspace(0, len(x) - 1, max_tokens).long()]
        out[key] = x.t().contiguous()
    return out
