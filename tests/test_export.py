"""Export validates on every family and on MiniLM; a corrupted graph fails with exit 1."""

from __future__ import annotations

import json

import onnx
import pytest
from conftest import MINILM

from squeeze.cli.main import main
from squeeze.compress import checkpoint as ck
from squeeze.compress.export import export_onnx, tensorrt_readiness


def test_export_validates_every_family(tiny, tmp_path):
    name, folder = tiny
    out = tmp_path / f"{name}.onnx"
    assert main(["export", str(folder), "-o", str(out)]) == 0
    report = json.loads((tmp_path / f"{name}.onnx.report.json").read_text())
    assert report["ok"] and len(report["validation"]) == 2
    assert report["validation"][0]["shape"] != report["validation"][1]["shape"]  # dynamic axes exercised
    graph = onnx.load(str(out)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    # decoders default to the KV-cache graph, whose axes carry Optimum's names
    batch, seq = ("batch_size", "sequence_length") if name in ("llama", "gpt2") else ("batch", "sequence")
    assert dims[0].dim_param == batch
    if name != "vit":
        assert dims[1].dim_param == seq


def test_export_minilm_with_fidelity_and_tensorrt(tmp_path):
    ckpt = ck.load(MINILM)
    report = export_onnx(ckpt, tmp_path / "m.onnx", reference=ckpt, target="tensorrt")
    assert report["ok"] and report["tensorrt"]["ok"]
    assert report["fidelity_vs_reference"]["cos_worst"] > 0.99999
    assert report["validation"][1]["max_abs"] < 1e-4  # measured 5.2e-6
    assert "input_ids" in report["tensorrt"]["dynamic_inputs"]


def test_corrupted_graph_fails_with_exit_1(tiny_dirs, tmp_path, monkeypatch, capsys):
    """Perturb one weight of the exported graph: ORT now disagrees with PyTorch."""
    import squeeze.kernels.registry as kreg

    real = kreg.finalize_onnx

    def corrupt(model, plain=False):
        model = real(model, plain=plain)
        init = max(model.graph.initializer, key=lambda t: len(onnx.numpy_helper.to_array(t).reshape(-1)))
        arr = onnx.numpy_helper.to_array(init).copy()
        arr.reshape(-1)[0] += 5.0
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        return model

    monkeypatch.setattr(kreg, "finalize_onnx", corrupt)
    out = tmp_path / "bad.onnx"
    assert main(["export", str(tiny_dirs["gpt2"]), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "validation failed" in err and "logits" in err
    assert not out.exists()  # never under the requested name
    assert (tmp_path / "bad.rejected.onnx").exists()
    report = json.loads((tmp_path / "bad.onnx.report.json").read_text())
    assert report["ok"] is False and any(c["mismatched"] > 0 for c in report["validation"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", "-1"], "batch"),
        (["--batch", "100000"], "batch"),
        (["--opset", "99"], "opset"),
        (["--atol", "-1"], "tolerance"),
        (["--seq-len", "100000"], "seq-len"),
        (["--target", "tpu"], "target"),
    ],
)
def test_bad_export_options(tiny_dirs, tmp_path, capsys, args, message):
    out = tmp_path / "x.onnx"
    assert main(["export", str(tiny_dirs["bert"]), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_existing_onnx_needs_force(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "x.onnx"
    out.write_text("mine")
    assert main(["export", str(tiny_dirs["bert"]), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "mine"
    assert main(["export", str(tiny_dirs["bert"]), "-o", str(out), "--force"]) == 0


def test_tensorrt_check_flags_contrib_and_unknown_ops(tmp_path):
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("FastGelu", ["a"], ["b"], domain="com.microsoft"),
        helper.make_node("MatMulInteger", ["b", "b"], ["c"]),
        helper.make_node("Mystery", ["c"], ["y"], domain="acme"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 18),
            helper.make_opsetid("com.microsoft", 1),
            helper.make_opsetid("acme", 1),
        ],
    )
    trt = tensorrt_readiness(model)
    assert not trt["ok"]
    text = " ".join(trt["problems"])
    assert "FastGelu" in text and "MatMulInteger" in text and "acme::Mystery" in text and "Relu" not in text
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    assert main(["check", str(path), "--target", "tensorrt"]) == 1
    assert main(["check", str(tmp_path / "none.onnx")]) == 2


def test_eval_onnx_against_checkpoint(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "l.onnx"
    assert main(["export", str(tiny_dirs["llama"]), "-o", str(out)]) == 0
    capsys.readouterr()
    assert (
        main(["eval", str(out), "--ref", str(tiny_dirs["llama"]), "--json", "--samples", "4", "--seq-len", "32"]) == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["cos_worst"] > 0.99999 and res["top1"] == 1.0 and res["ppl"] == pytest.approx(res["ppl_ref"], rel=1e-4)
