"""``prune``: attention / MLP / block dropping (LLM-Drop).

prune.py     PruneConfig, PruneResult, PrunePass: modes, checks, planning, applying, replay
scores.py    the per-layer similarity scores, layer by layer (``capture.Layerwise``)
kv_cache.py  decoders: dense KV-cache slots for the kept attention layers
"""

from squeeze.compress.passes.prune.prune import (
    POST_LN_KEEP_NORM,
    Plan,
    PruneConfig,
    PrunePass,
    PruneResult,
    count_of,
    layer_scores,
    rank_joint,
    to_indices,
    to_mask,
    top_k,
)

__all__ = [
    "POST_LN_KEEP_NORM",
    "Plan",
    "PruneConfig",
    "PrunePass",
    "PruneResult",
    "count_of",
    "layer_scores",
    "rank_joint",
    "to_indices",
    "to_mask",
    "top_k",
]
