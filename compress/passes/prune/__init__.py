"""``prune``: attention / MLP / block dropping (LLM-Drop).

config.py    PruneConfig (modes, amounts, lists), Plan, PruneResult, index lists <-> masks
prune.py     PrunePass: checks, planning, applying, replay
scores.py    the per-layer similarity scores, layer by layer (``capture.Layerwise``)
kv_cache.py  decoders: dense KV-cache slots for the kept attention layers
"""

from squeeze.compress.passes.prune.config import (
    POST_LN_KEEP_NORM,
    Plan,
    PruneConfig,
    PruneResult,
    count_of,
    to_indices,
    to_mask,
)
from squeeze.compress.passes.prune.prune import PrunePass
from squeeze.compress.passes.prune.scores import layer_scores, rank_joint, top_k

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
