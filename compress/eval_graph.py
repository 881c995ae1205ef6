"""Fidelity of a saved model against a reference: a checkpoint folder or an exported ``.onnx``
graph run by ONNX Runtime (``squeeze eval``). Above the workshop: it reads KV-cache graphs with
``export_decoder``'s prefill feeds, and loads folders with the ``load`` it is given (``run.load``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from squeeze.compress.calibration import Batch
from squeeze.compress.errors import SqueezeError
from squeeze.compress.evaluate import Reference, compare_outputs, ort_session, reference_outputs


class _OrtModel:
    """Runs an exported graph like a model, for ``squeeze eval model.onnx --ref CKPT``."""

    def __init__(self, path: Path):
        self.session = ort_session(path)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.output = self.session.get_outputs()[0].name

    def outputs(self, batch: Batch) -> dict[str, torch.Tensor]:

        feeds = {}
        for name in self.inputs:
            t = batch.get(name)
            if name == "position_ids" or name.startswith("past_key_values."):  # a KV-cache graph: prefill
                from squeeze.compress.export_decoder import prefill_feed

                feeds[name] = prefill_feed(self.session, name, batch)
                continue
            if t is None and "input_ids" not in batch:
                raise SqueezeError(f"the graph wants input {name!r}, which the reference's data does not have")
            feeds[name] = (t if t is not None else torch.zeros_like(batch["input_ids"])).numpy()
        try:
            out = self.session.run(None, feeds)[0]
        except Exception as exc:  # ORT's own exception types: the graph does not fit these inputs
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SqueezeError(f"the graph failed on the reference's inputs ({msg[:200]})") from None
        return {self.output: torch.from_numpy(out).float()}


def evaluate_against(model_ref: str, reference, spec, *, load: Callable[[str], Any]) -> dict[str, float]:
    """Fidelity of a checkpoint folder (read with ``load``, e.g. ``run.load``) or an ``.onnx`` graph
    against a reference checkpoint."""
    from squeeze.compress.calibration import batches

    path = Path(model_ref)
    other = None
    if path.suffix == ".onnx":
        if path.is_dir():
            raise SqueezeError(f"{path}: is a folder, not an .onnx file")
        if not path.is_file():
            raise SqueezeError(f"{path}: no such file")
        try:
            runner = _OrtModel(path)
        except Exception as exc:  # ORT's own exception types
            raise SqueezeError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    else:
        other = load(model_ref)
        if other.family.name != reference.family.name:
            raise SqueezeError(
                f"{model_ref} is a {other.family.name} model, the reference a {reference.family.name} model"
            )
    # A data file given to eval is all evaluation data (it used to keep only its last quarter: 10 of
    # 40 labelled rows); the built-in corpus keeps its held-apart part.
    split = "eval" if spec.source in ("builtin", "synthetic") else "all"
    data = batches(reference, spec, split=split)
    ref = reference_outputs(reference.model, reference.family, data)
    if other is None:
        new = Reference(family=reference.family, outputs=[runner.outputs(b) for b in data], batches=data)
        name = next(iter(ref.outputs[0]))
        if runner.output != name:
            raise SqueezeError(f"{path}: graph output {runner.output!r} is not the reference's {name!r}")
    else:
        try:
            new = reference_outputs(other.model, other.family, data)
        except IndexError:  # an embedding lookup past the end: the reference's tokens are not its tokens
            raise SqueezeError(
                f"{model_ref}: the reference's token ids are outside its vocabulary "
                "(not a compressed version of the reference)"
            ) from None
    return compare_outputs(ref, new)
