"""``merge``: logit-averaging merge of several models (Growing Transformers).

merge.py    MergeConfig (a MultiModelConfig), MergeResult, MergePass, MergedModel
compat.py   the compatibility checks run before any work (family, outputs, tokenizers)
"""

from squeeze.compress.passes.merge.merge import (
    HEADLESS_NOTE,
    LogitMerge,
    MergeConfig,
    MergedModel,
    MergedOutput,
    MergePass,
    MergeResult,
    build_expert,
    normalize,
)

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
