"""Decoders after attention drops: one dense KV-cache slot per kept attention layer.

``Family.renumber_kv_cache`` gives each kept attention layer a dense slot (0, 1, ...); this
module makes every KV cache the model uses hold exactly those slots.

transformers builds its caches from the config (``DynamicCache(config=...)`` in the model's
forward and in ``generate``; ``StaticCache`` likewise) with one slot per configured layer, typed
per original layer (full or sliding attention). After renumbering, slots ``n_kept..L-1`` would
stay empty forever (``cache.is_initialized`` never turns true, ``len(cache)`` is wrong, a static
cache could pre-allocate them) and slot ``s`` would carry the type of original layer ``s`` rather
than of the layer now using it. A forward pre-hook on the base model (installed once; it
survives deepcopy) therefore rebuilds a config-shaped cache as the kept layers' own slots, in
order, and creates that cache itself when the model would otherwise build one. Caches that
already have ``n_kept`` slots, or that grow lazily (``DynamicCache()``), are left alone.
"""

from __future__ import annotations

from typing import Any, cast

import transformers
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from squeeze.compress.families import Family


def compact_kv_cache(family: Family, model: nn.Module) -> list[int | None]:
    """Renumber the kept attention layers' cache slots and install the hook that compacts every
    cache the model builds. Returns the slot of every layer (None where attention is dropped).
    Nothing is installed when no attention layer is skipped."""
    slots = family.renumber_kv_cache(model)
    kept = [i for i, s in enumerate(slots) if s is not None]
    base = family.base(model)
    cast(Any, base)._squeeze_kv_kept = (tuple(kept), len(slots))  # a plain attribute, read by the hook
    if len(kept) < len(slots) and not any(h is _compact_cache_hook for h in base._forward_pre_hooks.values()):
        base.register_forward_pre_hook(_compact_cache_hook, with_kwargs=True)
    return slots


def _compact_cache_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of :func:`compact_kv_cache` on a decoder's base model."""
    kept, total = getattr(module, "_squeeze_kv_kept", ((), 0))
    if len(kept) == total:
        return None
    key = "past_key_values" if "past_key_values" in kwargs else "cache"
    cache = kwargs.get(key)
    if cache is None:
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(module.config, "use_cache", False))
        if not use_cache or module.training:
            return None
        config = cast(transformers.PretrainedConfig, module.config)
        cache = DynamicCache(config=config)  # what the model would build itself
        kwargs[key] = cache
    if isinstance(cache, Cache) and len(cache.layers) == total:
        cache.layers = [cache.layers[i] for i in kept]
    return args, kwargs
