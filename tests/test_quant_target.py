"""``quantize --target tensorrt``: static W8A8 as symmetric int8 Q/DQ that ``squeeze check`` calls
TensorRT-ready, while the default static scheme (uint8, asymmetric) is still refused."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from squeeze.cli.main import main
from squeeze.compress.passes.quantize import QuantizeConfig
from squeeze.compress.passes.quantize.target import signed_zero
from squeeze.kernels import quant_dequant

FAST = ["--activations", "int8", "--samples", "8", "--seq-len", "16", "--clip-steps", "2"]


def _zero_points(path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type == "Identity" and n.input[0] in consts:  # a shared zero point
            consts[n.output[0]] = consts[n.input[0]]
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) >= 24  # tiny bert: 6 linears x 4 layers, each a quantized input and weight
    return [consts[n.input[2]] for n in qdq if len(n.input) > 2 and n.input[2]]


def test_tensorrt_target_exports_symmetric_int8_qdq_that_check_accepts(tiny_dirs, tmp_path, capsys):
    trt, ort = tmp_path / "trt", tmp_path / "ort"
    assert main(["quantize", str(tiny_dirs["bert"]), "-o", str(trt), "--target", "tensorrt", *FAST]) == 0
    assert main(["quantize", str(tiny_dirs["bert"]), "-o", str(ort), *FAST]) == 0
    assert capsys.readouterr().out.count("target tensorrt: symmetric int8") == 1  # the ledger says what changed
    # the folder is reloaded (int8 zero points rebuilt from the manifest), exported and validated
    assert main(["export", str(trt), "-o", str(tmp_path / "trt.onnx"), "--target", "tensorrt"]) == 0
    zps = _zero_points(tmp_path / "trt.onnx")
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    assert main(["check", str(tmp_path / "trt.onnx")]) == 0
    assert main(["export", str(ort), "-o", str(tmp_path / "ort.onnx"), "--no-optimize"]) == 0
    assert any(z.dtype == np.uint8 for z in _zero_points(tmp_path / "ort.onnx"))
    capsys.readouterr()
    assert main(["check", str(tmp_path / "ort.onnx"), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    graph = onnx.load(str(tmp_path / "ort.onnx")).graph
    n_q = sum(n.op_type == "QuantizeLinear" for n in graph.node)  # every one, shared zero points included
    assert any(p.startswith(f"QuantizeLinear with a uint8 zero point: {n_q} node(s)") for p in problems), problems


def test_signed_grid_is_the_mid_grid_unsigned_one_shifted():
    """The reparameterization's zero point 2^(b-1) becomes 0 with the very same dequantized values
    (QuantizeLinear saturates an int8 zero point's codes to [-128, 127])."""
    x = torch.linspace(-3, 3, 1001)
    scale = torch.tensor(2.0 / 127)
    unsigned = quant_dequant.reference(x, scale, torch.tensor(128, dtype=torch.uint8), 8)
    zero = signed_zero(torch.tensor(128.0), 8).to(torch.int8)
    assert torch.equal(quant_dequant.reference(x, scale, zero, 8), unsigned)
    assert quant_dequant.reference(torch.tensor([-9.0]), scale, zero, 8).item() == pytest.approx(-128 * 2.0 / 127)
    with pytest.raises(AssertionError):
        signed_zero(torch.tensor(131.0), 8)


@pytest.mark.parametrize(
    "kw",
    [{"activations": "dynamic"}, {"weights": "int4", "activations": "int8"}, {"method": "bct", "activations": "int8"}],
)
def test_tensorrt_target_refuses_what_it_cannot_build(kw):
    with pytest.raises(ValueError, match="tensorrt"):
        QuantizeConfig(target="tensorrt", **kw)
