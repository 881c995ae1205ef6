"""Export formats: fp16, int4 / int8 MatMulNBits, tied weights stored once, Optimum folders,
external data, opsets past the TorchScript exporter's."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto
from tiny import make_tiny

from squeeze.cli.main import main
from squeeze.compress import checkpoint as ck
from squeeze.compress.export_folder import export_model
from squeeze.compress.export_graph import weight_bytes


def test_fp16_decoder_validates_against_the_fp16_model(tiny_dirs, tmp_path):
    ckpt = ck.load(tiny_dirs["llama"])
    r32 = export_model(ckpt, tmp_path / "f32.onnx", latency=False)
    r16 = export_model(ckpt, tmp_path / "f16.onnx", dtype="fp16", latency=False)
    assert r16["ok"] and r16["generation"]["tokens_equal"] and r16["atol"] == 2e-2
    graph = onnx.load(str(tmp_path / "f16.onnx")).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    assert types["logits"] == types["past_key_values.0.key"] == types["present.3.value"] == TensorProto.FLOAT16
    assert types["input_ids"] == TensorProto.INT64
    w16 = weight_bytes(onnx.load(str(tmp_path / "f16.onnx")))
    assert w16 < 0.55 * weight_bytes(onnx.load(str(tmp_path / "f32.onnx")))
    assert r32["generation"]["reference_tokens"] != [] and r32["dtype"] == "fp32"


def test_int4_matmulnbits_is_really_4_bits(tmp_path):
    """A decoder whose linears dominate its size: int4 < 0.6x int8, both generate like the twin."""
    folder = make_tiny("llama", tmp_path / "wide", hidden=256, layers=1, intermediate_size=512)
    ckpt = ck.load(folder)
    r8 = export_model(ckpt, tmp_path / "i8.onnx", weights="int8", block_size=128, latency=False)
    r4 = export_model(ckpt, tmp_path / "i4.onnx", weights="int4", block_size=128, latency=False)
    assert r4["ok"] and r8["ok"] and r4["generation"]["tokens_equal"]
    assert r4["nbits"] == {"MatMulNBits": 8, "GatherBlockQuantized": 1}  # 7 linears + head; the table
    size4, size8 = (tmp_path / "i4.onnx").stat().st_size, (tmp_path / "i8.onnx").stat().st_size
    assert size4 < 0.6 * size8, (size4, size8)
    graph = onnx.load(str(tmp_path / "i4.onnx")).graph
    consts = {i.name for i in graph.initializer}
    assert not [n for n in graph.node if n.op_type in ("MatMul", "Gemm", "Gather") and set(n.input) & consts]
    node = next(n for n in graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 128


def test_folder_output_is_optimum_style_and_tied_weights_are_stored_once(tiny_dirs, tmp_path):
    out = tmp_path / "onnx"
    assert main(["export", str(tiny_dirs["gpt2"]), "-o", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json"} <= names
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(str(out)).model_type == "gpt2"
    assert AutoTokenizer.from_pretrained(str(out)).encode("hello")
    report = json.loads((out / "model.onnx.report.json").read_text())
    assert report["tied_bytes_saved"] == 384 * 32 * 4  # gpt2's lm_head is wte: one copy in the file
    model = ck.load(tiny_dirs["gpt2"]).model
    params = sum(p.numel() * 4 for p in model.parameters())  # parameters() yields a tied tensor once
    assert weight_bytes(onnx.load(str(out / "model.onnx"))) <= params + 4096
    assert main(["export", str(tiny_dirs["gpt2"]), "-o", str(out)]) == 2  # an existing folder needs --force


def test_external_data_and_a_newer_opset(tiny_dirs, tmp_path):
    ckpt = ck.load(tiny_dirs["bert"])
    report = export_model(ckpt, tmp_path / "m.onnx", dtype="fp16", external=True, opset=21, latency=False)
    assert report["ok"] and report["files"] == ["m.onnx", "m.onnx.data"]
    shell = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    external = [t for t in shell.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert len(external) > 10 and all(len(t.raw_data) < 1024 for t in shell.graph.initializer)
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert next(o.version for o in model.opset_import if o.domain == "") == 21


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtype", "fp8"], "dtype"),
        (["--weights", "int3"], "weights"),
        (["--block-size", "48"], "block size"),
        (["--task", "translation"], "task"),
        (["--opset", "99"], "opset"),
        (["--batch", "0"], "batch"),
        (["--seq-len", "200"], "seq-len"),
    ],
)
def test_bad_format_options(tiny_dirs, tmp_path, capsys, args, message):
    assert main(["export", str(tiny_dirs["llama"]), "-o", str(tmp_path / "x.onnx"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_optimize_fuses_bert_attention_and_still_validates(tiny_dirs, tmp_path):
    out = tmp_path / "fused.onnx"
    assert main(["export", str(tiny_dirs["bert"]), "-o", str(out), "--optimize", "--weights", "int4"]) == 0
    report = json.loads((tmp_path / "fused.onnx.report.json").read_text())
    assert report["ok"] and report["fused"]["Attention"] == 4 and report["fused"]["SkipLayerNormalization"] >= 4
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"Attention", "MatMulNBits"} <= ops  # quantized after fusion
    assert main(["export", str(tiny_dirs["llama"]), "-o", str(tmp_path / "l.onnx"), "--optimize"]) == 2


def test_tensorrt_check_refuses_asymmetric_qdq_and_groups_problems(tmp_path):
    import numpy as np
    from onnx import helper, numpy_helper

    from squeeze.compress.export import tensorrt_readiness

    def qdq(i, zp):
        return [
            helper.make_node("QuantizeLinear", [f"x{i}", "s", zp], [f"q{i}"], name=f"q{i}"),
            helper.make_node("DequantizeLinear", [f"q{i}", "s", zp], [f"x{i + 1}"], name=f"dq{i}"),
        ]

    inits = [
        numpy_helper.from_array(np.float32(0.1), "s"),
        numpy_helper.from_array(np.uint8(128), "zu8"),
        numpy_helper.from_array(np.int8(3), "z3"),
        numpy_helper.from_array(np.int8(0), "z0"),
    ]
    nodes = qdq(0, "z0") + qdq(1, "zu8") + qdq(2, "z3") + qdq(3, "zu8")
    nodes += [helper.make_node("FastGelu", ["x4"], [f"g{i}"], domain="com.microsoft") for i in range(3)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("g0", TensorProto.FLOAT, [4])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    trt = tensorrt_readiness(model)
    assert not trt["ok"] and len(trt["problems"]) == 5, trt["problems"]  # one line per problem, not per node
    text = "\n".join(trt["problems"])
    assert "QuantizeLinear with a uint8 zero point: 2 node(s)" in text  # qdq(1) and qdq(3)
    assert (
        "DequantizeLinear with a non-zero zero point: 1 node(s)" in text and "FastGelu" in text and "3 node(s)" in text
    )
    assert all("; fix: " in line for line in trt["problems"])
    symmetric = helper.make_model(
        helper.make_graph(
            qdq(0, "z0"),
            "s",
            graph.input,
            [helper.make_tensor_value_info("x1", TensorProto.FLOAT, [4])],
            initializer=inits,
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    assert tensorrt_readiness(symmetric)["ok"]


def test_weight_only_squeeze_checkpoint_keeps_its_own_codes(tiny_dirs, tmp_path):
    """quantize --weights int4 --activations none (GPTQ rounding): MatMulNBits carries exactly
    those codes (unpacked nibbles == the QuantLinear's codes), not a re-rounding."""
    import numpy as np

    from squeeze.compress.calibration import DataSpec
    from squeeze.compress.passes import PassContext, run_pass
    from squeeze.compress.passes.quantize import QuantizeConfig, QuantizePass

    ckpt = ck.load(tiny_dirs["llama"])
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=DataSpec(samples=8, seq_len=16, batch_size=4))
    cfg = QuantizeConfig(weights="int4", activations="none", embeddings=False)
    quant = run_pass(QuantizePass(cfg), [ckpt], ctx, measure_fidelity=False)
    report = export_model(quant, tmp_path / "g.onnx", weights="int4", latency=False)
    assert report["ok"] and report["rule"] == {"atol": 1e-4, "rtol": 1e-3}  # exact twin: fp32 tolerances
    down = ckpt.family.role(ckpt.family.layers(quant.model)[0], "mlp_out")  # (32, 64): blocks of 32
    graph = onnx.load(str(tmp_path / "g.onnx")).graph
    packed = [onnx.numpy_helper.to_array(t) for t in graph.initializer if t.dims == [32, 2, 16]]
    nibbles = [np.stack([p & 15, p >> 4], -1).reshape(32, 64) for p in packed]
    codes = down.qweight.numpy().astype(np.int32)
    assert any(np.array_equal(n.astype(np.int32), codes) for n in nibbles)
