"""The kernel registry: one explicit dict, and the two hooks ``compress/export.py`` calls.

Each kernel module defines a :class:`Kernel` entry and is listed in ``KERNELS``. A kernel has:

* a pure PyTorch ``reference`` (the source of truth);
* a ``torch.library.custom_op`` in the ``squeeze`` namespace with a fake (meta) implementation,
  so models call ``torch.ops.squeeze.<name>`` and exporters see one node;
* a TorchScript ONNX ``symbolic``. Two kinds exist:
  - ``domain="squeeze"``: the symbolic emits one ``squeeze::<OnnxOp>`` node, and ``function()``
    builds the ONNX FunctionProto (domain ``squeeze``, version 1, a body of standard ops) that
    :func:`finalize_onnx` attaches, so stock onnxruntime runs it and the node stays visible;
  - ``domain=""`` (a *lowering*): what the op computes is expressible in standard ONNX ops, so
    the symbolic emits them directly (e.g. DynamicQuantizeLinear + MatMulInteger, which ONNX
    Runtime fuses into its integer kernels). No custom node, no function, nothing to inline.
* the TensorRT plugin name and version a TensorRT deployment maps a custom node to (``None`` for
  lowerings TensorRT parses natively; a note says when TensorRT has no equivalent at all).

``squeeze kernels --validate`` runs :func:`validate` on each: reference vs custom op vs onnxruntime
on random shapes, reporting the max error.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from typing import Any

import onnx
import torch

from squeeze.kernels import (
    dense_sparse_linear,
    dequant_linear,
    dynamic_qlinear,
    logsqrt2_softmax,
    quant_dequant,
    static_qlinear,
)
from squeeze.kernels.base import DOMAIN, DOMAIN_VERSION, Kernel

KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        logsqrt2_softmax.KERNEL,
        dynamic_qlinear.KERNEL,
        static_qlinear.KERNEL,
        dequant_linear.KERNEL,
        quant_dequant.KERNEL,
        dense_sparse_linear.KERNEL,
        dense_sparse_linear.KERNEL_INT8,
    )
}


# --------------------------------------------------------------------------------------------
# Export hooks
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def torchscript_symbolics(opset: int) -> Iterator[None]:
    """Register every kernel's TorchScript ONNX symbolic for the duration of an export."""
    registered = []
    try:
        for k in KERNELS.values():
            torch.onnx.register_custom_op_symbolic(k.qualname, k.symbolic, opset)
            registered.append(k.qualname)
        yield
    finally:
        for name in registered:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


def finalize_onnx(model: onnx.ModelProto, *, plain: bool = False) -> onnx.ModelProto:
    """Attach the ONNX functions of the custom-domain nodes a graph uses (or inline them
    when ``plain``), and the ``squeeze`` opset import."""
    by_op = {k.onnx_op: k for k in KERNELS.values() if k.domain == DOMAIN}
    used = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN})
    if not used:
        return model
    unknown = [u for u in used if u not in by_op]
    if unknown:
        raise ValueError(f"graph uses squeeze ops with no registered kernel: {', '.join(unknown)}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    have = {(f.domain, f.name) for f in model.functions}
    for op in used:
        if (DOMAIN, op) not in have:
            model.functions.append(by_op[op].function(opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    if plain:
        from onnx import inliner  # (``import onnx.inliner`` here would make ``onnx`` local to the function)

        model = inliner.inline_local_functions(model)
        del model.functions[:]
        keep = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    return model


# --------------------------------------------------------------------------------------------
# Validation: reference vs custom op vs onnxruntime
# --------------------------------------------------------------------------------------------


class _OneOp(torch.nn.Module):
    """Calls one kernel: the first argument is the graph input, tensors after it are buffers
    (initializers, as in a real model), ints are constants."""

    def __init__(self, kernel: Kernel, args: tuple):
        super().__init__()
        self.kernel = kernel
        self.spec: list[tuple[str, Any]] = []
        for i, a in enumerate(args[1:], 1):
            if isinstance(a, torch.Tensor):
                self.register_buffer(f"a{i}", a)
                self.spec.append(("buffer", f"a{i}"))
            else:
                self.spec.append(("const", a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rest = [getattr(self, v) if kind == "buffer" else v for kind, v in self.spec]
        return self.kernel.op(x, *rest)


def onnx_model_for(kernel: Kernel, args: tuple, opset: int = 18, plain: bool = False) -> onnx.ModelProto:
    """A one-node ONNX model (after :func:`finalize_onnx`) computing ``kernel`` on ``args``."""
    module = _OneOp(kernel, args).eval()
    x = args[0]
    dyn = {"x": {i: f"d{i}" for i in range(x.ndim)}, "y": {i: f"o{i}" for i in range(x.ndim)}}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), torchscript_symbolics(opset):
        warnings.simplefilter("ignore")
        # torch's stub types f as a path only; export writes to a file object as well
        torch.onnx.export(
            module,
            (x,),
            buf,  # type: ignore[arg-type]
            input_names=["x"],
            output_names=["y"],
            dynamic_axes=dyn,
            opset_version=opset,
            dynamo=False,
        )
    model = finalize_onnx(onnx.load_from_string(buf.getvalue()), plain=plain)
    onnx.checker.check_model(model)
    return model


def validate(kernel: Kernel, seed: int = 0, opset: int = 18) -> dict[str, Any]:
    """Run a kernel's reference, its custom op and onnxruntime on random shapes.

    Returns the max absolute errors (custom op vs reference, onnxruntime vs reference), the
    shapes tried, and ``ok`` when both stay within the kernel's tolerance.
    """
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(seed)
    err_op = err_ort = 0.0
    shapes = []
    for args in kernel.examples(gen):
        ref = kernel.reference(*args)
        with torch.no_grad():
            got_op = kernel.op(*args)
        model = onnx_model_for(kernel, args, opset)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        got_ort = torch.from_numpy(sess.run(None, {"x": args[0].numpy()})[0])
        err_op = max(err_op, float((got_op - ref).abs().max()))
        err_ort = max(err_ort, float((got_ort.to(ref.dtype) - ref).abs().max()))
        shapes.append("x".join(map(str, args[0].shape)))
    return {
        "kernel": kernel.name,
        "onnx_op": (f"{kernel.domain}::" if kernel.domain else "") + kernel.onnx_op,
        "shapes": shapes,
        "max_err_op": err_op,
        "max_err_ort": err_ort,
        "tolerance": kernel.tolerance,
        "ok": err_op <= kernel.tolerance and err_ort <= kernel.tolerance,
    }
