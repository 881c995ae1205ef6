"""``merge``: logit-averaging merge of several models (Growing Transformers).

merge.py    MergeConfig (a MultiModelConfig), MergeResult, MergePass
model.py    MergedModel (the experts, their averaged outputs, per-expert KV caches), expert records
compat.py   the compatibility checks run before any work (family, outputs, tokenizers)
"""

from squeeze.compress.passes.merge.merge import HEADLESS_NOTE, LogitMerge, MergeConfig, MergePass, MergeResult
from squeeze.compress.passes.merge.model import MergedModel, MergedOutput, build_expert, normalize

__all__ = [
    "HEADLESS_NOTE",
    "LogitMerge",
    "MergeConfig",
    "MergePass",
    "MergeResult",
    "MergedModel",
    "MergedOutput",
    "build_expert",
    "normalize",
]
