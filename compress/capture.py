"""Activation capture: the inputs of layer i, layer by layer, and hooks on chosen modules.

Layer by layer (:class:`Layerwise`). One forward per batch, with every transformer layer swapped
for a catcher, records what each layer is called with (the residual stream entering layer 0,
and every layer's own other arguments: attention masks, rotary tables; sliding-window models
have one mask per layer type); the forward stops at the last catcher, so no layer runs. Then
the walk runs layer 0 on its inputs, whose outputs are the inputs of layer 1, and so on: a full
walk costs L layer forwards per batch (O(L)), and memory holds one layer's activations for the
calibration set, never the whole network's. Changing layer i inside the loop body (quantizing,
factorizing it) changes what layer i+1 sees, exactly as a full forward of the changed model
would. With a ``teacher`` (the unchanged model, same family and depth), the walk carries the
teacher's stream alongside, so a pass can compare or fit layer i of the student to the
teacher's on inputs each model really produces::

    walk = Layerwise(student, family, batches, teacher=teacher)
    for i in walk:                       # walk.inputs[b]: the stream entering student layer i
        target = walk.teacher_outputs()  # teacher layer i on the teacher's own stream
        ... change student layer i ...
    # after each body the walk runs student layer i (as changed) to reach layer i + 1

Hooks (:func:`record`). A context manager that records the first input or the output of given
modules on every call, by key::

    with record({"up": up, "down": down}, what="input") as seen:
        family.forward(model, batch)
    seen["up"]  # one tensor per call
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from squeeze.compress.families import Family

Batch = dict[str, torch.Tensor]
__all__ = ["LAYER_STREAM", "Call", "Layerwise", "layer_calls", "record"]

#: Set by compress/offload.py for an out-of-core run: an object with ``model`` (the skeleton whose
#: layers sit on the meta device), ``enter(i)`` (onload layer i's weights) and ``leave(i)`` (write
#: and offload it). A walk over that model calls ``enter(i)`` before its body and ``leave(i)``
#: once layer i has produced the inputs of layer i + 1; walks over other models ignore it.
LAYER_STREAM: ContextVar[Any] = ContextVar("squeeze_layer_stream", default=None)


@dataclass
class Call:
    """The arguments one layer was called with on one batch (``args[0]``: the residual stream)."""

    args: tuple
    kwargs: dict[str, Any]


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for one layer: records its call and passes the hidden states on unchanged."""

    def __init__(self, calls: list[Call], last: bool, as_tuple: bool = False):
        super().__init__()
        self.calls, self.last, self.as_tuple = calls, last, as_tuple

    def forward(self, *args, **kwargs):
        self.calls.append(Call(args, kwargs))
        if self.last:
            raise _Stop
        return (args[0],) if self.as_tuple else args[0]  # as the layer it stands in for returns


@torch.no_grad()
def layer_calls(model: nn.Module, family: Family, batches: list[Batch]) -> list[list[Call]]:
    """``calls[i][b]``: how layer i is called on batch b, from one forward per batch that runs no
    layer (``calls[i][b].args[0]`` for i > 0 is layer i-1's input passed on, not its output)."""
    layers = family.layers(model)
    original = list(layers)
    calls: list[list[Call]] = [[] for _ in original]
    try:
        for i in range(len(layers)):
            layers[i] = _Catcher(calls[i], last=i == len(original) - 1, as_tuple=family.layer_returns_tuple)
        for batch in batches:
            try:
                family.forward(model, batch)
            except _Stop:
                pass
    finally:
        for i, layer in enumerate(original):
            layers[i] = layer
    return calls


def _first(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, (tuple, list)) else y


class _Stream:
    """One model's walk state: its layers, their calls, and the stream entering the current one."""

    def __init__(self, model: nn.Module, family: Family, batches: list[Batch]):
        self.layers = family.layers(model)
        self.calls = layer_calls(model, family, batches)
        self.hidden: list[torch.Tensor] = [c.args[0] for c in self.calls[0]] if self.calls else []
        self.forwards = 0

    @torch.no_grad()
    def run(self, i: int, layer: nn.Module | None = None) -> list[torch.Tensor]:
        layer = self.layers[i] if layer is None else layer
        out = []
        for h, call in zip(self.hidden, self.calls[i], strict=True):
            out.append(_first(layer(h, *call.args[1:], **call.kwargs)))
        self.forwards += 1
        return out


class Layerwise:
    """Walk a model's layers in order over ``batches``; see the module docstring.

    Iterating yields the layer index i; inside the body:

    * :attr:`inputs` / :attr:`teacher_inputs`: the stream entering layer i, one tensor per batch;
    * :attr:`masks`: each batch's attention mask (None where the batch has none);
    * :meth:`run` runs student layer i (or a given module called like it) on :attr:`inputs`;
    * :meth:`teacher_outputs` runs teacher layer i on the teacher's stream (cached for the step);
    * :meth:`keep` hands the walk outputs the body already computed with the final layer i, so
      advancing does not run it again.

    :attr:`forwards` counts layer forwards over all batches (one per layer and pass over the
    batches), the cost measure the quantize benchmark reports.
    """

    def __init__(self, model: nn.Module, family: Family, batches: list[Batch], *, teacher: nn.Module | None = None):
        self.model, self.family, self.batches = model, family, batches
        self.masks = [b.get("attention_mask") for b in batches]
        self._student = _Stream(model, family, batches)
        self._teacher = _Stream(teacher, family, batches) if teacher is not None else None
        if self._teacher is not None and len(self._teacher.layers) != len(self._student.layers):
            raise ValueError(
                f"teacher has {len(self._teacher.layers)} layers, student {len(self._student.layers)}: "
                "a layer-by-layer walk pairs layer i with layer i"
            )
        stream = LAYER_STREAM.get()
        self._stream = stream if stream is not None and stream.model is model else None
        self.index = -1
        self._kept: list[torch.Tensor] | None = None
        self._teacher_out: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self._student.layers)

    @property
    def layer(self) -> nn.Module:
        return self._student.layers[self.index]

    @property
    def inputs(self) -> list[torch.Tensor]:
        return self._student.hidden

    @property
    def teacher_inputs(self) -> list[torch.Tensor]:
        if self._teacher is None:
            raise ValueError("this walk has no teacher")
        return self._teacher.hidden

    @property
    def calls(self) -> list[Call]:
        """How layer i is called on each batch (its masks and rotary tables in ``kwargs``)."""
        return self._student.calls[self.index]

    @property
    def forwards(self) -> int:
        return self._student.forwards + (self._teacher.forwards if self._teacher is not None else 0)

    def run(self, layer: nn.Module | None = None) -> list[torch.Tensor]:
        """Outputs of student layer i (or ``layer``, called the same way) on the current inputs."""
        return self._student.run(self.index, layer)

    def teacher_outputs(self) -> list[torch.Tensor]:
        if self._teacher is None:
            raise ValueError("this walk has no teacher")
        if self._teacher_out is None:
            self._teacher_out = self._teacher.run(self.index)
        return self._teacher_out

    def keep(self, outputs: list[torch.Tensor]) -> None:
        """Use ``outputs`` (of the final layer i on :attr:`inputs`) as the inputs of layer i + 1."""
        self._kept = outputs

    def __iter__(self) -> Iterator[int]:
        n = len(self)
        for i in range(n):
            self.index, self._kept, self._teacher_out = i, None, None
            if self._stream is not None:
                self._stream.enter(i)
            yield i
            if i == n - 1:
                if self._stream is not None:
                    self._stream.leave(i)
                break
            nxt = self._kept if self._kept is not None else self._student.run(i)
            if self._teacher is not None:
                self._teacher.hidden = self.teacher_outputs()
            self._student.hidden = nxt
            if self._stream is not None:
                self._stream.leave(i)
        self._kept = self._teacher_out = None


@contextlib.contextmanager
def record(
    modules: dict[str, nn.Module], *, what: Literal["input", "output"] = "output", detach: bool = True
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the first input or the output (first element of a tuple) of each module per call.

    Yields ``{key: [tensor per call]}``; the hooks are removed on exit, also on error.
    """
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in modules}

    def hook(key: str):
        if what == "input":

            def pre(_mod, args):
                x = args[0]
                seen[key].append(x.detach() if detach else x)

            return pre

        def post(_mod, _args, out):
            y = _first(out)
            seen[key].append(y.detach() if detach else y)

        return post

    handles = [
        m.register_forward_pre_hook(hook(k)) if what == "input" else m.register_forward_hook(hook(k))
        for k, m in modules.items()
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
