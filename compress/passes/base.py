"""The pass interface: Pass, PassConfig, PassContext, PassReport, and ``run_pass``.

A pass is a frozen pydantic config plus a class with two halves:

* ``apply(models, ctx)`` does the work (may need calibration data) and returns the new model;
  it records what a reload needs in ``ctx.result`` (stored in the manifest edit) and may add
  ``ctx.metrics`` (stored in the ledger) and ``ctx.warn(...)`` messages.
* ``restructure(model, edit, family)`` re-creates the shapes from a manifest edit, with no data,
  so that ``checkpoint.load`` can then load the state dict strictly.

Typed results: a pass declares ``Result: ClassVar[type[PassResult]]``; ``apply`` puts either that
model or its ``model_dump(mode="json")`` into ``ctx.result`` (``run.apply`` stores the dump in the
manifest edit); ``pass_.result_of(edit)`` reads it back typed, ``pass_.summary(result)`` gives the
lines the CLI prints, ``pass_.export_rule(edit)`` how ``squeeze export`` validates a graph that
carries this edit (None: elementwise tolerances). Multi-model passes take a
:class:`MultiModelConfig`, whose ``others`` lists the extra model references (recipe key
``others``; ``with`` is still read).

Passes never print: they log, and report progress through ``ctx.progress``; only ``cli/`` draws.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from torch import nn

from squeeze.compress.families import Family

if TYPE_CHECKING:
    from squeeze.compress.calibration import DataSpec
    from squeeze.compress.checkpoint import Checkpoint

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (label, done, total)


class PassConfig(BaseModel):
    """Base of every pass config: unknown keys are errors, and configs never change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MultiModelConfig(PassConfig):
    """Base of the configs of multi-model passes (fuse, merge): ``others`` are the model references
    that join the input, in order (the recipe engine and ``run.apply`` load them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    others: list[str] = Field(
        default_factory=list,
        validation_alias=AliasChoices("others", "with", "with_"),
        description="the other models (references), in order, after the input",
    )


class PassResult(BaseModel):
    """What a pass records in its manifest edit. Subclasses declare their fields (and may forbid
    extras); this base keeps any keys, for passes that declare no Result."""

    model_config = ConfigDict(extra="allow")

    def summary(self) -> list[str]:
        """One-line facts for the CLI (no markup)."""
        return []


class ExportRule(BaseModel):
    """How an exported graph is validated when elementwise tolerances do not suit it: cosine of
    (ORT, PyTorch) at least ``min_cosine`` and max |ORT - PyTorch| / max |PyTorch| at most
    ``max_abs_ratio``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_cosine: float
    max_abs_ratio: float

    def check(self, ort_out: Any, twin_out: Any) -> dict[str, Any]:
        """Judge one output pair (numpy arrays): cosine, relative max error, and whether both pass."""
        import numpy as np

        a = np.asarray(ort_out).reshape(-1).astype(np.float64)
        b = np.asarray(twin_out).reshape(-1).astype(np.float64)
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
        ratio = float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))
        ok = bool(np.isfinite(a).all() and cos >= self.min_cosine and ratio <= self.max_abs_ratio)
        return {"cosine": cos, "max_abs_ratio": ratio, "ok": ok}

    def loosest(self, other: ExportRule | None) -> ExportRule:
        if other is None:
            return self
        return ExportRule(
            min_cosine=min(self.min_cosine, other.min_cosine),
            max_abs_ratio=max(self.max_abs_ratio, other.max_abs_ratio),
        )


def result_dump(result: PassResult | dict[str, Any]) -> dict[str, Any]:
    """``ctx.result`` as the JSON-able dict the manifest stores."""
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    return dict(result)


class Edit(BaseModel):
    """One manifest entry: which pass, with which config, and what it decided."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    pass_name: str = Field(alias="pass")
    config: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] = Field(default_factory=dict)

    @field_validator("result", mode="before")
    @classmethod
    def _typed_result(cls, v: Any) -> Any:
        return v.model_dump(mode="json") if isinstance(v, BaseModel) else v

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


@dataclass
class PassReport:
    """One ledger row: what a pass cost and gained."""

    name: str
    config: dict[str, Any]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    fidelity: dict[str, float]
    seconds: float
    peak_mem_mb: float
    warnings: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PassContext:
    """What a pass may use: family, seeded randomness, data, device, progress, result slots."""

    family: Family
    checkpoint: Checkpoint | None = None
    calibration: DataSpec | None = None
    seed: int = 0
    device: str = "cpu"
    progress: ProgressFn | None = None
    #: what apply records for the manifest: the pass's Result model or its JSON dump
    result: PassResult | dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: every input checkpoint, in order (set by run_pass; multi-model passes read side files)
    inputs: list[Checkpoint] = field(default_factory=list)
    #: where a training pass may keep resumable state (set by run.apply; None: nowhere)
    workdir: Path | None = None
    _calib: list[dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    _eval: list[dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def warn(self, message: str) -> None:
        log.warning(message)
        if message not in self.warnings:
            self.warnings.append(message)

    def step(self, label: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(label, done, total)

    def calib_batches(self) -> list[dict[str, torch.Tensor]]:
        """Calibration batches for this model (built once, lazily)."""
        if self._calib is None:
            from squeeze.compress.calibration import DataSpec, batches

            spec = self.calibration or DataSpec()
            self._calib = batches(self.checkpoint, spec, split="calib", warn=self.warn)
        return self._calib

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        """Held-apart evaluation batches (disjoint from calibration)."""
        if self._eval is None:
            from squeeze.compress.calibration import DataSpec, batches

            spec = (self.calibration or DataSpec()).for_eval()
            self._eval = batches(self.checkpoint, spec, split="eval", warn=self.warn)
        return self._eval


class Pass(ABC):
    """A compression pass. Subclasses set ``name`` and ``Config``."""

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]]
    #: several input models (fuse, merge)
    multi_model: ClassVar[bool] = False
    #: apply() reads ctx.calib_batches()
    needs_calibration: ClassVar[bool] = False
    #: the output wraps its input models (merge): single-model passes must not run on it
    wraps_models: ClassVar[bool] = False
    #: the typed manifest result
    Result: ClassVar[type[PassResult]] = PassResult

    def __init__(self, config: PassConfig | None = None, **kwargs: Any):
        self.config = config if config is not None else self.Config(**kwargs)

    #: set by ``passes.replay_edit`` before ``restructure``: replays a raw manifest edit, for passes
    #: whose result records other models with their own edits (merge)
    replay: Callable[[nn.Module, dict, Family], nn.Module] | None = None

    def check(self, family: Family, models: list[nn.Module] | None = None) -> None:  # noqa: B027
        """Refuse unsupported models before touching anything (raise SqueezeError)."""

    def check_data(self, ctx: PassContext) -> None:  # noqa: B027
        """Refuse unusable calibration data (``ctx.calibration``) before any work."""

    def preview(self, models: list[nn.Module], ctx: PassContext) -> PassResult | dict[str, Any] | None:
        """What ``apply`` would decide, without changing anything (``--dry-run``); None: nothing to show."""
        return None

    @abstractmethod
    def apply(self, models: list[nn.Module], ctx: PassContext) -> nn.Module:
        """Do the work; return the new model; record the manifest result in ``ctx.result``."""

    @abstractmethod
    def restructure(self, model: nn.Module, edit: Edit, family: Family) -> nn.Module:
        """Re-create the shapes an ``apply`` produced, from the manifest edit alone."""

    def result_of(self, edit: Edit | dict[str, Any]) -> PassResult:
        """The typed result of a manifest edit of this pass."""
        raw = edit.result if isinstance(edit, Edit) else dict(edit.get("result") or {})
        return self.Result.model_validate(raw)

    def summary(self, result: PassResult | dict[str, Any]) -> list[str]:
        """Lines the CLI prints after a run (the Result's own ``summary()`` by default)."""
        if not isinstance(result, PassResult):
            result = self.Result.model_validate(result)
        return result.summary()

    def export_rule(self, edit: Edit) -> ExportRule | None:
        """How to validate an exported graph of a model that carries ``edit`` (None: the
        ordinary elementwise tolerances)."""
        return None
