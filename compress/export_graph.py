"""Graph-level finishing of an exported ONNX model: tied weights stored once, fp16, external data.

* :func:`share_tied_weights`: the TorchScript exporter folds ``lm_head``'s transpose of a tied
  embedding into a second initializer, so SmolLM2-135M's 113 MB table was stored twice. Every
  float initializer that equals another one, or its transpose, is replaced by a reference to it
  (through one ``Transpose`` node, which ONNX Runtime folds at load time): the file holds each
  weight once.
* :func:`to_fp16`: ONNX Runtime's own float16 converter (``onnxruntime.transformers.float16``),
  inputs and outputs included, so ``past_key_values`` and ``logits`` are fp16 as in Optimum's
  fp16 exports. Validation then compares with the fp16 PyTorch model.
* :func:`save`: one external data file (``<name>.data``) when the weights pass
  ``EXTERNAL_DATA_BYTES`` (protobuf cannot serialise 2 GB); one self-contained file otherwise.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

# protobuf's hard limit is 2 GiB for the whole message; stay clear of it with the graph on top
EXTERNAL_DATA_BYTES = 1_800_000_000
_MIN_SHARED = 1024  # elements; small constants are not worth a node


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers (raw or external)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
        else:
            total += len(t.raw_data) or numpy_helper.to_array(t).nbytes
    return total


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() + str(a.shape) + str(a.dtype)


def share_tied_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Store each float initializer once: duplicates and 2-D transposes become references.

    Returns the model and the bytes saved.
    """
    graph = model.graph
    seen: dict[str, str] = {}
    flat: dict[str, str] = {}  # the same bytes under another shape (a 4-bit table and MatMulNBits' B)
    shapes = {}
    replace: dict[str, tuple[str, str]] = {}  # dropped name -> (kept name, "same" | "T" | "reshape")
    for init in graph.initializer:
        if int(np.prod(init.dims)) < _MIN_SHARED:
            continue
        arr = numpy_helper.to_array(init)
        key = _digest(arr)
        fkey = _digest(arr.reshape(-1))
        shapes[init.name] = arr.shape
        if key in seen:
            replace[init.name] = (seen[key], "same")
            continue
        if arr.ndim == 2 and _digest(arr.T) in seen:
            replace[init.name] = (seen[_digest(arr.T)], "T")
            continue
        if fkey in flat:
            replace[init.name] = (flat[fkey], "reshape")
            continue
        seen[key] = init.name
        flat[fkey] = init.name
    if not replace:
        return model, 0
    graph_inputs = {i.name for i in graph.input}
    replace = {k: v for k, v in replace.items() if k not in graph_inputs}
    saved = 0
    keep = []
    for init in graph.initializer:
        if init.name in replace:
            saved += numpy_helper.to_array(init).nbytes
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes: list[onnx.NodeProto] = []
    rename: dict[str, str] = {}
    for dropped, (kept, how) in replace.items():
        if how == "same":
            rename[dropped] = kept
            continue
        out = f"{dropped}__shared"
        if how == "T":
            nodes.append(helper.make_node("Transpose", [kept], [out], name=f"share_{len(nodes)}", perm=[1, 0]))
        else:
            shape = numpy_helper.from_array(np.array(shapes[dropped], np.int64), f"{dropped}__shape")
            graph.initializer.append(shape)
            nodes.append(helper.make_node("Reshape", [kept, shape.name], [out], name=f"share_{len(nodes)}"))
        rename[dropped] = out
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for out in graph.output:
        if out.name in rename:  # an output that is a weight: keep it by identity
            nodes.append(helper.make_node("Identity", [rename[out.name]], [out.name]))
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    return model, saved


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every float tensor in fp16, inputs and outputs included."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)


def save(model: onnx.ModelProto, path: Path, *, external: bool | None = None) -> list[Path]:
    """Write ``model`` to ``path`` (external data beside it when large, or when ``external``);
    return the files written."""
    path = Path(path)
    big = weight_bytes(model) > EXTERNAL_DATA_BYTES if external is None else external
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if big:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        onnx.checker.check_model(str(path))
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]


#: ONNX Runtime transformer-optimizer model types of the encoder families it fuses
FUSABLE = {"bert": "bert", "vit": "vit"}


def fuse(
    path: Path, family: str, num_heads: int, hidden_size: int, *, keep_gather: bool = False, attention: bool = True
) -> tuple[onnx.ModelProto, dict[str, int]]:
    """ONNX Runtime's transformer optimizer on the graph at ``path`` (exported with eager
    attention, the pattern it matches): fused Attention, SkipLayerNormalization, ... Returns the
    fused model and the counts of fused operators. ``keep_gather`` leaves the embedding lookup
    out of EmbedLayerNormalization, so a blockwise-quantized table can replace it; ``attention``
    False leaves the q/k/v MatMuls unfused (for MatMulNBits)."""
    import logging

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    options = FusionOptions(FUSABLE[family])
    options.enable_embed_layer_norm = not keep_gather
    options.enable_attention = attention
    opt = optimize_model(
        str(path),
        model_type=FUSABLE[family],
        num_heads=num_heads,
        hidden_size=hidden_size,
        opt_level=0,
        use_gpu=False,
        optimization_options=options,
    )
    stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    model = opt.model
    domains = {o.domain for o in model.opset_import}
    for domain in sorted({n.domain for n in model.graph.node} - domains - {"ai.onnx"}):
        # the optimizer leaves its contrib domain undeclared, which the version converter refuses
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return model, stats
