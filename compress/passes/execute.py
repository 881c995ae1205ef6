"""Running one pass on checkpoints: check once, copy, measure, record (``run.apply`` calls this).

:func:`run_pass` is the one place a pass is executed: it refuses what the pass cannot take
(before any work: a single-model pass on a model that wraps others, ``check``, ``check_data``),
hands the pass deep copies of the input models (an input is never mutated, whatever the pass
does with its arguments), measures fidelity against the first input on held-apart evaluation
data, and returns the new checkpoint with the pass's edit and ledger row in its manifest.
Loading references and saving live one floor up, in ``compress/run.py``.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

from squeeze.compress.checkpoint import Checkpoint
from squeeze.compress.dtypes import round_to_storage
from squeeze.compress.errors import SqueezeError
from squeeze.compress.evaluate import PeakMemory, compare_outputs, count_params, model_bytes, reference_outputs
from squeeze.compress.passes.base import Edit, Pass, PassContext, PassReport, result_dump

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["check_inputs", "preview", "run_pass"]


def check_inputs(
    pass_: Pass, inputs: list[Checkpoint], ctx: PassContext, wraps: Callable[[str], bool] = lambda name: False
) -> None:
    """Every refusal a run can make before any work, in one order for the CLI and recipes."""
    first = inputs[0]
    ctx.checkpoint = first
    ctx.inputs = list(inputs)
    if not pass_.multi_model and any(wraps(str(e.get("pass"))) for e in first.manifest.edits):
        raise SqueezeError(
            f"{pass_.name} cannot run on a merged model (it would change only the first expert); "
            "compress the experts first, then merge"
        )
    pass_.check(first.family, [c.model for c in inputs])
    pass_.check_data(ctx)


def preview(pass_: Pass, inputs: list[Checkpoint], ctx: PassContext, **kw: Any) -> dict[str, Any] | None:
    """Checks, then what the pass would decide (``--dry-run``); nothing is changed."""
    check_inputs(pass_, inputs, ctx, **kw)
    result = pass_.preview([c.model for c in inputs], ctx)
    return None if result is None else result_dump(result)


def run_pass(
    pass_: Pass,
    inputs: list[Checkpoint],
    ctx: PassContext,
    *,
    measure_fidelity: bool = True,
    wraps: Callable[[str], bool] | None = None,
) -> Checkpoint:
    """Run one pass on checkpoints; return the new checkpoint with its edit and ledger row.

    ``wraps(pass_name)`` says whether a manifest edit made its model a wrapper of several (the
    registry's ``wraps_models``; ``run.apply`` passes it). The fidelity is measured against the
    first input on held-apart evaluation data.
    """
    if wraps is None:
        wraps = _wraps_from_attribute(inputs)
    check_inputs(pass_, inputs, ctx, wraps)
    first = inputs[0]
    params_before, bytes_before = count_params(first.model), model_bytes(first.model)
    ref = reference_outputs(first.model, first.family, ctx.eval_batches()) if measure_fidelity else None
    models = []
    for c in inputs:  # the same model twice stays two models (merge saves each expert)
        models.append(copy.deepcopy(c.model))

    start = time.perf_counter()
    with PeakMemory() as mem:
        model = pass_.apply(models, ctx)
    seconds = time.perf_counter() - start
    model.eval()
    round_to_storage(model)  # measure what is saved: a bf16 folder's result in bf16

    fidelity: dict[str, float] = {}
    if ref is not None:
        fidelity = compare_outputs(ref, reference_outputs(model, first.family, ctx.eval_batches()))

    config = pass_.config.model_dump(mode="json")
    report = PassReport(
        name=pass_.name,
        config=config,
        params_before=params_before,
        params_after=count_params(model),
        bytes_before=bytes_before,
        bytes_after=model_bytes(model),
        fidelity=fidelity,
        seconds=round(seconds, 3),
        peak_mem_mb=round(mem.peak_mb, 1),
        warnings=list(ctx.warnings),
        metrics=dict(ctx.metrics),
    )
    manifest = first.manifest.with_edit(
        Edit(pass_name=pass_.name, config=config, result=result_dump(ctx.result)), report.to_dict()
    )
    return Checkpoint(model=model, family=first.family, manifest=manifest, source=first.source)


def _wraps_from_attribute(inputs: list[Checkpoint]) -> Callable[[str], bool]:
    """Without the registry at hand: a model that says it wraps others (``is_merged``) counts."""
    wrapped = bool(getattr(inputs[0].model, "is_merged", False))
    return lambda name: wrapped
