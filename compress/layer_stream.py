"""The machinery of out-of-core runs (compress/offload.py): a model skeleton on the meta device and
the stream that onloads and offloads its layers around each ``capture.Layerwise`` step.

:class:`Skeleton` builds a Hugging Face folder's architecture with every parameter on the meta
device (buffers real), reads the tensors outside the layers that a walk runs (embeddings, final
norm; not the head) and remembers each tensor's source name. :class:`LayerStream` is what
``capture.LAYER_STREAM`` holds during a pass: ``enter(i)`` reads layer i's tensors (one at a time,
``shards.SourceWeights``), ``leave(i)`` writes the finished layer (when asked) and puts it back
on the meta device, ``finish()`` writes every tensor not written yet, from memory or from the
source. :func:`entries` lists a module's saved tensors with the aliases dropped the way
``safetensors.torch.save_model`` drops them, so the output equals ``checkpoint.save``'s.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from squeeze.compress import dtypes
from squeeze.compress.capture import LAYER_STREAM
from squeeze.compress.checkpoint import check_safetensors, check_size, weight_files
from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import Family, build_from_config, family_for
from squeeze.compress.shards import ShardWriter, SourceWeights

__all__ = ["LayerStream", "Skeleton", "entries", "return_freed_memory", "streaming"]

#: glibc's mallopt parameter M_MMAP_THRESHOLD, and the value set for an out-of-core run
MALLOC_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 1 << 20


def return_freed_memory() -> None:
    """glibc: serve every allocation of 1 MiB or more with its own mapping, so a layer's freed
    tensors go back to the system. (glibc raises this threshold as large blocks are freed, up to
    32 MiB, after which a layer's weights come from the heap, whose freed space stays resident:
    a 0.5B model's out-of-core scoring then peaked at twice the bound.)"""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(MALLOC_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Every parameter registered inside is created on the meta device (buffers stay real)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _work(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def entries(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module, str, torch.Tensor]]:
    """(state-dict name, owner, attribute, tensor) of every saved tensor, aliases dropped the way
    safetensors' save_model drops them (the first name in sorted order stays)."""
    by_tensor: dict[int, tuple[str, nn.Module, str, torch.Tensor]] = {}
    for mname, mod in module.named_modules(prefix=prefix.rstrip("."), remove_duplicate=False):
        head = f"{mname}." if mname else ""
        for attr, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is None or attr in mod._non_persistent_buffers_set:
                continue
            name = head + attr
            if id(t) not in by_tensor or name < by_tensor[id(t)][0]:
                by_tensor[id(t)] = (name, mod, attr, t)
    return sorted(by_tensor.values(), key=lambda e: e[0])


class Skeleton:
    """A Hugging Face folder's model with its layers on the meta device; see the module docstring."""

    def __init__(self, folder: Path):
        from transformers import AutoConfig

        files, is_pickle = weight_files(folder)
        if is_pickle:
            raise SqueezeError(f"{files[0]}: out of core reads safetensors only (single tensors); convert it first")
        for f in files:
            check_safetensors(f)
        try:
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise SqueezeError(f"{folder}/config.json: {exc}") from None
        self.folder, self.files = folder, files
        self.family: Family = family_for(config.model_type)
        check_size(self.family, config, files, f"{folder}/config.json")
        with _params_on_meta():
            self.model = build_from_config(self.family, config)
        stored = getattr(config, "dtype", None)
        dtypes.set_storage(self.model, dtypes.stored_dtype(files, stored))
        self.weights = SourceWeights(files)
        #: (id(owner), attribute) -> the tensor's name in the source files
        self.source: dict[tuple[int, str], str] = {}
        #: name -> every name of the same tensor (tied weights: the file holds one of them)
        self.aliases: dict[str, list[str]] = {}
        by_tensor: dict[int, list[str]] = {}
        for mname, mod in self.model.named_modules(remove_duplicate=False):
            for attr, t in [*mod._parameters.items(), *mod._buffers.items()]:
                name = f"{mname}.{attr}" if mname else attr
                self.source.setdefault((id(mod), attr), name)
                if t is not None:
                    by_tensor.setdefault(id(t), []).append(name)
        for names in by_tensor.values():
            self.aliases.update(dict.fromkeys(names, sorted(set(names))))
        layer_ids = {id(t) for layer in self.family.layers(self.model) for t in layer.parameters()}
        head = self.family.head_module(self.model)
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        for _name, mod, attr, t in entries(self.model):  # embeddings, norms: what a walk runs
            if id(t) in layer_ids or (id(t) in head_ids and not self._shared(t, head)):
                continue
            self.onload(mod, attr)

    def _shared(self, t: torch.Tensor, head: nn.Module) -> bool:
        """Whether the head's tensor ``t`` is also held outside the head (tied embeddings)."""
        inside = {id(m) for m in head.modules()}
        return any(
            any(x is t for x in [*m._parameters.values(), *m._buffers.values()])
            for m in self.model.modules()
            if id(m) not in inside
        )

    def source_name(self, mod: nn.Module, attr: str) -> str | None:
        name = self.source.get((id(mod), attr))
        if name is None:
            return None
        return next((n for n in [name, *self.aliases.get(name, [])] if n in self.weights), None)

    def onload(self, mod: nn.Module, attr: str) -> None:
        """Read one tensor from the source into its place (tied owners see it: the object stays)."""
        name = self.source_name(mod, attr)
        old = mod._parameters.get(attr) if attr in mod._parameters else mod._buffers.get(attr)
        if name is None:
            if old is not None and old.device.type == "meta":
                raise SqueezeError(f"{self.folder}: the weights have no tensor for {attr} of {type(mod).__name__}")
            return
        t = _work(self.weights.get(name))
        if old is None or tuple(old.shape) != tuple(t.shape):
            raise SqueezeError(f"{self.folder}: {name} has shape {tuple(t.shape)}, the config builds another")
        if isinstance(old, nn.Parameter):
            torch.utils.swap_tensors(old, nn.Parameter(t, requires_grad=old.requires_grad))
        else:
            mod._buffers[attr] = t


class LayerStream:
    """Onloads and offloads the skeleton's layers for ``capture.Layerwise`` (``LAYER_STREAM``).

    ``peak_layers``: the most layers with materialized weights at any ``enter`` (the bound the
    tests assert); ``entered``: how often each layer was onloaded.
    """

    def __init__(self, sk: Skeleton, writer: ShardWriter | None, *, write_on_leave: bool = False):
        self.sk, self.model, self.writer, self.write_on_leave = sk, sk.model, writer, write_on_leave
        self.entered: Counter[int] = Counter()
        self.peak_layers = 0
        self.written: set[tuple[int, str]] = set()  # (id(owner), attribute) already in the output
        self._kept_buffers: dict[tuple[int, str], torch.Tensor] = {
            (id(m), a): b.clone()
            for layer in sk.family.layers(sk.model)
            for m in layer.modules()
            for a, b in m._buffers.items()
            if b is not None and b.device.type != "meta"
        }

    def _layer(self, i: int) -> tuple[nn.Module, str]:
        layer = self.sk.family.layers(self.model)[i]
        name = next(n for n, m in self.model.named_modules() if m is layer)
        return layer, name + "."

    def materialized_layers(self) -> int:
        """Layers holding any tensor off the meta device: parameters, buffers, or a tensor kept as
        a plain attribute (a cache, like QuantLinear's float weight)."""

        def held(m: nn.Module) -> list[torch.Tensor]:
            return [*m.parameters(recurse=False), *m.buffers(recurse=False)] + [
                v for v in vars(m).values() if isinstance(v, torch.Tensor)
            ]

        return sum(
            any(t.device.type != "meta" for m in layer.modules() for t in held(m))
            for layer in self.sk.family.layers(self.model)
        )

    def enter(self, i: int) -> None:
        layer, _ = self._layer(i)
        for m in layer.modules():
            for attr in [*m._parameters, *m._buffers]:
                t = m._parameters.get(attr) if attr in m._parameters else m._buffers.get(attr)
                if t is None:
                    continue
                if attr in m._buffers and self.sk.source_name(m, attr) is None and (id(m), attr) in self._kept_buffers:
                    m._buffers[attr] = self._kept_buffers[(id(m), attr)].clone()
                else:
                    self.sk.onload(m, attr)
        self.entered[i] += 1
        self.peak_layers = max(self.peak_layers, self.materialized_layers())

    def leave(self, i: int) -> None:
        layer, prefix = self._layer(i)
        if self.writer is not None and self.write_on_leave:
            store = dtypes.storage_dtype(self.model)
            for name, mod, attr, t in entries(layer, prefix):
                self.writer.add(name, t.detach().to(store) if t.dtype == dtypes.WORK else t.detach())
                self.written.add((id(mod), attr))
        layer.to("meta")
        for m in layer.modules():  # caches kept as plain attributes (QuantLinear's float weight)
            for k in [k for k, v in vars(m).items() if isinstance(v, torch.Tensor)]:
                delattr(m, k)

    def finish(self) -> list[Path]:
        """Write every tensor not written yet (from memory, or from the source when on meta)."""
        assert self.writer is not None
        store = dtypes.storage_dtype(self.model)
        for name, mod, attr, t in entries(self.model):
            if (id(mod), attr) in self.written:
                continue
            if t.device.type == "meta":
                src = self.sk.source_name(mod, attr)
                if src is None:
                    raise SqueezeError(f"out of core: {name} has no source tensor and was never computed")
                t = _work(self.sk.weights.get(src))
            self.writer.add(name, t.detach().to(store) if t.dtype == dtypes.WORK else t.detach())
        return self.writer.close()


@contextlib.contextmanager
def streaming(stream: LayerStream) -> Iterator[LayerStream]:
    token = LAYER_STREAM.set(stream)
    try:
        yield stream
    finally:
        LAYER_STREAM.reset(token)
