"""The pass registry (one explicit dict) and manifest replay. The registry key, the CLI subcommand
and the recipe step name are the same word. No import side effects, no package walking."""

from __future__ import annotations

from typing import Any

from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family
from squeeze.compress.passes.base import (
    Edit,
    ExportRule,
    MultiModelConfig,
    Pass,
    PassConfig,
    PassContext,
    PassReport,
    PassResult,
)
from squeeze.compress.passes.distill import DistillPass
from squeeze.compress.passes.execute import run_pass
from squeeze.compress.passes.factorize import FactorizePass
from squeeze.compress.passes.fuse import FusePass
from squeeze.compress.passes.merge import MergePass
from squeeze.compress.passes.prune import PrunePass
from squeeze.compress.passes.quantize import QuantizePass
from squeeze.compress.passes.reparam.reparam import ReparamPass

REGISTRY: dict[str, type[Pass]] = {
    "prune": PrunePass,
    "merge": MergePass,
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


def pass_for(config: PassConfig) -> type[Pass]:
    """The pass whose ``Config`` ``config`` is."""
    for cls in REGISTRY.values():
        if type(config) is cls.Config:
            return cls
    raise SqueezeError(f"{type(config).__name__} is not the config of a registered pass")


def replay_edit(model: nn.Module, raw: dict[str, Any], family: Family) -> nn.Module:
    """Re-create one manifest edit's structural change on ``model`` (no data needed)."""
    edit = Edit.model_validate(raw)
    cls = get_pass(edit.pass_name)
    pass_ = cls(cls.Config(**edit.config))
    pass_.replay = replay_edit
    return pass_.restructure(model, edit, family)


def replay(model: nn.Module, edits: list[dict[str, Any]], family: Family) -> nn.Module:
    """Every edit of a manifest, in order."""
    for raw in edits:
        model = replay_edit(model, raw, family)
    return model


def export_rule(edits: list[dict[str, Any]]) -> ExportRule | None:
    """How to validate the graph of a model carrying ``edits``: the loosest rule any of their
    passes asks for (None: elementwise tolerances)."""
    rule: ExportRule | None = None
    for raw in edits:
        edit = Edit.model_validate(raw)
        cls = REGISTRY.get(edit.pass_name)
        if cls is None:
            continue
        own = cls(cls.Config(**edit.config)).export_rule(edit)
        if own is not None:
            rule = own.loosest(rule)
    return rule


__all__ = [
    "REGISTRY",
    "Edit",
    "ExportRule",
    "MultiModelConfig",
    "Pass",
    "PassConfig",
    "PassContext",
    "PassReport",
    "PassResult",
    "export_rule",
    "get_pass",
    "pass_for",
    "replay",
    "replay_edit",
    "run_pass",
]
