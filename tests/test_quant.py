"""The quantize pass on tiny models of every family: checkpoint, reload, export, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from squeeze.cli.main import main
from squeeze.compress import load, save
from squeeze.compress.calibration import DataSpec
from squeeze.compress.evaluate import model_outputs
from squeeze.compress.families import FAMILIES as FAMILY_TABLE
from squeeze.compress.passes import PassContext, run_pass
from squeeze.compress.passes.quantize import QuantizeConfig, QuantizePass, onnx_check
from squeeze.compress.passes.quantize.modules import QuantEmbedding, QuantLinear

FAMILIES = ("bert", "vit", "llama", "gpt2")
SPEC = DataSpec(samples=16, seq_len=32, batch_size=8, eval_samples=8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Calibration images for the tiny ViT (static activations refuse synthetic data)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "digits.npz"
    np.savez(path, pixel_values=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    return str(path)


def _quantize(folder, images=None, **cfg):
    ckpt = load(folder)
    spec = SPEC if ckpt.family.modality == "text" else SPEC.model_copy(update={"source": images})
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=spec)
    return ckpt, run_pass(QuantizePass(QuantizeConfig(**cfg)), [ckpt], ctx), ctx


def _outputs(ckpt, batch):
    (out,) = model_outputs(ckpt.model, ckpt.family, batch).values()
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_reload_equals_the_in_memory_quantized_model(name, tiny_dirs, images, tmp_path):
    act = "dynamic" if name in ("bert", "gpt2") else "int8"
    _, new, _ = _quantize(tiny_dirs[name], images, activations=act, clip_steps=5)
    out = save(new, tmp_path / "q")
    back = load(out)
    batch = PassContext(
        family=new.family,
        checkpoint=new,
        calibration=SPEC if name != "vit" else SPEC.model_copy(update={"source": images}),
    ).eval_batches()[0]
    with torch.no_grad():
        assert torch.equal(_outputs(new, batch), _outputs(back, batch))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert any(k.endswith("qweight") and v == "I8" for k, v in dtypes.items())
    assert any(k.endswith("w_scale") and v == "F32" for k, v in dtypes.items())
    assert any(k.endswith("w_zero") for k in dtypes)
    if act != "dynamic":
        assert any(k.endswith("a_zero") and v == "U8" for k, v in dtypes.items())


def test_static_repquant_uses_logsqrt2_attention_and_reports_the_ledger(tiny_dirs, images):
    _, new, _ctx = _quantize(tiny_dirs["vit"], images, activations="int8", clip_steps=5)
    edit = new.manifest.edits[-1]
    assert edit["result"]["attention"] == {"bits": 8, "softmax": "logsqrt2", "layers": [0, 1, 2, 3]}
    groups = new.manifest.ledger[-1]["metrics"]["groups"]
    assert groups["0.attn_in"]["where"] == "norm"  # pre-LN: folded into the LayerNorm affine
    assert float(groups["0.attn_in"]["zero"]).is_integer()
    assert groups["0.mlp_out"]["where"] == "affine"
    notes = new.manifest.ledger[-1]["metrics"]["notes"]
    assert any("patch-embedding" in n for n in notes) and any("mask stay float" in n for n in notes)


def test_llama_and_gpt2_say_which_steps_have_no_equivalent(tiny_dirs):
    _, new, ctx = _quantize(tiny_dirs["llama"], activations="int8", clip_steps=0)
    assert any("rmsnorm" in w for w in ctx.warnings)
    _, new, ctx = _quantize(tiny_dirs["llama"])
    assert any("grouped-query" in w for w in ctx.warnings)
    _, new, ctx = _quantize(tiny_dirs["gpt2"])
    assert any("Conv1D" in n for n in new.manifest.ledger[-1]["metrics"]["notes"])
    tables = new.manifest.edits[-1]["result"]["embeddings"]
    assert list(tables) == ["1:"]  # wpe quantized; wte is tied to the LM head and stays float


def _rule_check(report, rule):
    return all(c["cosine"] >= rule["min_cosine"] for c in report["validation"])


def test_export_dynamic_uses_ort_integer_kernels(tiny_dirs, tmp_path):
    from squeeze.compress.export import export_onnx

    _, new, _ = _quantize(tiny_dirs["bert"])
    ckpt = load(save(new, tmp_path / "q"))
    rule = onnx_check.validation_rule(ckpt.manifest)
    report = export_onnx(ckpt, tmp_path / "m.onnx", atol=0.5, rtol=0.5, latency=False)
    assert _rule_check(report, rule), report["validation"]
    kernels = onnx_check.integer_kernels(tmp_path / "m.onnx")["integer_kernels"]
    assert kernels.get("DynamicQuantizeMatMul", 0) + kernels.get("MatMulIntegerToFloat", 0) == 24, kernels
    assert report["custom_ops"] == []


def test_export_static_keeps_the_logsqrt2_node_and_runs_qdq_kernels(tiny_dirs, images, tmp_path):
    import onnx

    from squeeze.compress.export import export_onnx

    _, new, _ = _quantize(tiny_dirs["vit"], images, activations="int8", clip_steps=5)
    ckpt = load(save(new, tmp_path / "q"))
    rule = onnx_check.validation_rule(ckpt.manifest)
    data = DataSpec(source=images)
    report = export_onnx(ckpt, tmp_path / "m.onnx", atol=0.5, rtol=0.5, data=data, latency=False)
    assert _rule_check(report, rule), report["validation"]
    assert report["custom_ops"] == ["squeeze::LogSqrt2Softmax"]
    graph = onnx.load(str(tmp_path / "m.onnx"))
    assert sum(n.op_type == "LogSqrt2Softmax" for n in graph.graph.node) == 4
    kernels = onnx_check.integer_kernels(tmp_path / "m.onnx")["integer_kernels"]
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) >= 16, kernels
    plain = export_onnx(ckpt, tmp_path / "p.onnx", atol=0.5, rtol=0.5, data=data, plain=True, latency=False)
    assert plain["custom_ops"] == []


def test_bct_quantizes_weights_and_inputs_per_block(tiny_dirs, tmp_path):
    from squeeze.compress.export import export_onnx

    _, new, _ = _quantize(tiny_dirs["bert"], activations="int8", method="bct", block_size=16)
    specs = new.manifest.edits[-1]["result"]["linears"]["0"]
    assert specs["q"]["w_blocks"] == 2 and specs["q"]["a_blocks"] == 2 and specs["q"]["act"] == "block"
    assert specs["mlp_out"]["w_blocks"] == 4  # 64 inputs, blocks of 16
    q = next(m for m in new.model.modules() if isinstance(m, QuantLinear))
    assert q.w_scale.shape == (q.out_features, 2) and q.a_scale.shape == (q.in_features,)
    assert new.manifest.ledger[-1]["fidelity"]["cos_worst"] > 0.99
    ckpt = load(save(new, tmp_path / "q"))
    report = export_onnx(ckpt, tmp_path / "m.onnx", atol=0.5, rtol=0.5, latency=False)
    assert _rule_check(report, onnx_check.validation_rule(ckpt.manifest))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--weights", "int1"], "int2..int16"),
        (["--weights", "int17"], "int2..int16"),
        (["--activations", "int0"], "int2..int16"),
        (["--activations", "fp8"], "int2..int16"),
        (["--weights", "int16"], "weights must be int8"),  # dynamic activations are ORT's int8 kernels
        (["--method", "bct"], "bct"),  # bct needs static or no activation quantization
    ],
)
def test_bad_bits_and_combinations_are_refused(flags, message, tiny_dirs, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dirs["bert"]), "-o", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_static_activations_need_real_calibration_data(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dirs["vit"]), "-o", str(out), "--activations", "int8"]) == 2
    assert "calibration images" in capsys.readouterr().err
    assert (
        main(["quantize", str(tiny_dirs["bert"]), "-o", str(out), "--activations", "int8", "--calib", "synthetic"]) == 2
    )
    assert "not synthetic" in capsys.readouterr().err
    assert not out.exists()


def test_every_family_is_quantizable_and_an_unknown_type_is_refused(tmp_path, capsys):
    """Quantize accepts every family in the table (its own list once missed one), and a model type
    squeeze does not know (T5) is refused with the supported list, nothing written."""
    for family in FAMILY_TABLE.values():
        QuantizePass().check(family, [])
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5"}))
    out = tmp_path / "q"
    assert main(["quantize", str(folder), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unsupported model_type 't5'" in err and all(f in err for f in ("bert", "llama", "gpt2"))
    assert not out.exists()


def test_an_already_quantized_checkpoint_is_refused(tiny_dirs, tmp_path, capsys):
    first = tmp_path / "q1"
    assert main(["quantize", str(tiny_dirs["bert"]), "-o", str(first), "--samples", "8"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(first), "-o", str(tmp_path / "q2")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "q2").exists()
    assert any(isinstance(m, QuantEmbedding) for m in load(first).model.modules())
