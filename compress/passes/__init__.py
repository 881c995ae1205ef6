"""The pass registry: one explicit dict. The registry key, the CLI subcommand and the recipe
step name are the same word. No import side effects, no package walking."""

from __future__ import annotations

from squeeze.compress.errors import SqueezeError
from squeeze.compress.passes.base import (
    Edit,
    ExportRule,
    MultiModelConfig,
    Pass,
    PassConfig,
    PassContext,
    PassReport,
    PassResult,
    run_pass,
)
from squeeze.compress.passes.distill import DistillPass
from squeeze.compress.passes.drop import PrunePass
from squeeze.compress.passes.factorize import FactorizePass
from squeeze.compress.passes.fuse import FusePass
from squeeze.compress.passes.logit_merge import LogitMerge
from squeeze.compress.passes.quantize import QuantizePass
from squeeze.compress.passes.reparam.reparam import ReparamPass

REGISTRY: dict[str, type[Pass]] = {
    "prune": PrunePass,
    "merge": LogitMerge,
    "quantize": QuantizePass,
    "distill": DistillPass,
    "reparam": ReparamPass,
    "factorize": FactorizePass,
    "fuse": FusePass,
}


def get_pass(name: str) -> type[Pass]:
    """The pass class registered under ``name``; a clear error listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise SqueezeError(f"unknown pass {name!r}; known passes: {', '.join(sorted(REGISTRY)) or 'none'}") from None


__all__ = ["REGISTRY", "Edit", "ExportRule", "MultiModelConfig", "Pass", "PassConfig", "PassContext", "PassReport",
           "PassResult", "get_pass", "run_pass"]
