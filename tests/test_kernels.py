"""squeeze.kernels: reference vs custom op vs onnxruntime, export hooks, ``squeeze kernels``."""

from __future__ import annotations

import onnx
import pytest
import torch

from squeeze.cli.main import main
from squeeze.kernels.registry import KERNELS, finalize_onnx, onnx_model_for, validate


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_three_implementations_agree(name):
    result = validate(KERNELS[name], seed=1)
    assert result["ok"], result
    assert result["max_err_op"] <= KERNELS[name].tolerance
    assert result["max_err_ort"] <= KERNELS[name].tolerance


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_custom_op_registration_and_fake_implementation(name):
    k = KERNELS[name]
    args = k.examples(torch.Generator().manual_seed(2))[0]
    torch.library.opcheck(k.op, args, test_utils=("test_schema", "test_faketensor"))


def test_custom_domain_kernels_have_a_function_and_a_tensorrt_plugin():
    custom = [k for k in KERNELS.values() if k.domain == "squeeze"]
    assert [k.name for k in custom] == ["logsqrt2_softmax", "dense_sparse_linear", "dense_sparse_linear_int8"]
    for k in custom:
        fn = k.function(18)
        assert (fn.domain, fn.name) == ("squeeze", k.onnx_op)
        assert all(n.domain in ("", "ai.onnx") for n in fn.node)  # a body of standard ops
        assert k.tensorrt_plugin and k.tensorrt_plugin_version


def test_custom_node_stays_in_the_graph_unless_plain():
    k = KERNELS["logsqrt2_softmax"]
    args = k.examples(torch.Generator().manual_seed(3))[0]
    kept = onnx_model_for(k, args)
    assert [(n.domain, n.op_type) for n in kept.graph.node if n.domain == "squeeze"] == [("squeeze", "LogSqrt2Softmax")]
    assert [f.name for f in kept.functions] == ["LogSqrt2Softmax"]
    assert any(o.domain == "squeeze" and o.version == 1 for o in kept.opset_import)
    plain = onnx_model_for(k, args, plain=True)
    assert not any(n.domain == "squeeze" for n in plain.graph.node)
    assert not plain.functions and not any(o.domain == "squeeze" for o in plain.opset_import)
    assert "Softmax" in {n.op_type for n in plain.graph.node}


def test_lowerings_emit_standard_ops_only():
    for name in ("dynamic_qlinear", "static_qlinear", "dequant_linear", "quant_dequant"):
        k = KERNELS[name]
        model = onnx_model_for(k, k.examples(torch.Generator().manual_seed(4))[0])
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), name
        assert not model.functions


def test_finalize_refuses_an_unknown_squeeze_op():
    node = onnx.helper.make_node("NoSuchOp", ["x"], ["y"], domain="squeeze")
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", 1, [1])],
        [onnx.helper.make_tensor_value_info("y", 1, [1])],
    )
    with pytest.raises(ValueError, match="NoSuchOp"):
        finalize_onnx(onnx.helper.make_model(graph))


def test_kernels_cli_lists_and_validates(capsys):
    import json

    assert main(["kernels"]) == 0
    assert "logsqrt2_softmax" in capsys.readouterr().out
    assert main(["kernels", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(KERNELS)
    assert rows["logsqrt2_softmax"]["tensorrt_plugin"] == "SqueezeLogSqrt2Softmax v1"
    assert main(["kernels", "--validate", "--json"]) == 0
    assert all(r["validation"]["ok"] for r in json.loads(capsys.readouterr().out))
