"""ONNX Runtime's transformer fusions are export's default for bert / vit, validated like any graph,
and every decision is one line in the report (compress/export_fuse.py)."""

from __future__ import annotations

import json

import onnx
import pytest

from squeeze.cli.main import main
from squeeze.compress import checkpoint as ck
from squeeze.compress.errors import ValidationFailed
from squeeze.compress.export_folder import export_model


def _ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        counts[f"{n.domain or 'ai.onnx'}::{n.op_type}"] = counts.get(f"{n.domain or 'ai.onnx'}::{n.op_type}", 0) + 1
    return counts


def _report(path) -> dict:
    return json.loads(path.with_name(path.name + ".report.json").read_text())


def test_default_export_of_bert_is_fused_and_validated(tiny_dirs, tmp_path):
    out = tmp_path / "b.onnx"
    assert main(["export", str(tiny_dirs["bert"]), "-o", str(out)]) == 0
    ops, report = _ops(out), _report(out)
    assert ops["com.microsoft::Attention"] == 4 and ops["com.microsoft::SkipLayerNormalization"] >= 4
    assert report["ok"] and all(c["max_abs"] < 1e-4 for c in report["validation"])  # measured 1.4e-6
    assert report["fusion"].startswith("fused: Attention 4")
    plain = tmp_path / "p.onnx"
    assert main(["export", str(tiny_dirs["bert"]), "-o", str(plain), "--no-optimize"]) == 0
    assert not [k for k in _ops(plain) if k.startswith("com.microsoft")]
    assert _report(plain)["fusion"] == "not fused: --no-optimize" and _report(plain)["ok"]
    # the model is traced with eager attention for the optimizer, and handed back as it was
    assert ck.load(tiny_dirs["bert"]).model.config._attn_implementation != "eager"


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_decoders_stay_unfused_and_say_so(tiny_dirs, tmp_path, name):
    report = export_model(ck.load(tiny_dirs[name]), tmp_path / "d.onnx", latency=False, new_tokens=4)
    assert report["ok"] and not [k for k in _ops(tmp_path / "d.onnx") if k.startswith("com.microsoft")]
    assert report["fusion"].startswith("not fused:") and name in report["fusion"]


def test_optimizer_failure_falls_back_with_a_line(tiny_dirs, tmp_path, monkeypatch):
    import squeeze.compress.export_fuse as ef

    def broken(*a, **k):
        raise RuntimeError("pattern mismatch")

    monkeypatch.setattr(ef, "fuse", broken)
    report = export_model(ck.load(tiny_dirs["bert"]), tmp_path / "b.onnx", latency=False)
    assert report["ok"] and "optimizer failed (RuntimeError: pattern mismatch)" in report["fusion"]
    assert not [k for k in _ops(tmp_path / "b.onnx") if k.startswith("com.microsoft")]


def test_a_fused_graph_that_disagrees_is_never_written(tiny_dirs, tmp_path, monkeypatch):
    """Default: exported again unfused, the reason recorded; --optimize: exit 1 (ValidationFailed)."""
    from onnx import numpy_helper

    import squeeze.compress.export_fuse as ef

    real = ef.fuse

    def corrupt(*a, **k):
        model, stats = real(*a, **k)
        qkv = next(n.input[1] for n in model.graph.node if n.op_type == "Attention")  # the packed weight
        init = next(t for t in model.graph.initializer if t.name == qkv)
        arr = numpy_helper.to_array(init).copy()
        arr += 0.5
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        return model, stats

    monkeypatch.setattr(ef, "fuse", corrupt)
    ckpt = ck.load(tiny_dirs["bert"])
    report = export_model(ckpt, tmp_path / "b.onnx", latency=False)
    assert report["ok"] and report["fusion"].startswith("not fused: the fused graph failed validation")
    assert not [k for k in _ops(tmp_path / "b.onnx") if k.startswith("com.microsoft")]
    assert not (tmp_path / "b.rejected.onnx").exists()
    with pytest.raises(ValidationFailed, match="validation failed"):
        export_model(ckpt, tmp_path / "o.onnx", latency=False, optimize=True)
    assert not (tmp_path / "o.onnx").exists() and (tmp_path / "o.rejected.onnx").exists()


def test_weights_default_keeps_qkv_quantizable_and_opset_conversion_takes_fused_graphs(tiny_dirs, tmp_path):
    ckpt = ck.load(tiny_dirs["bert"])
    report = export_model(ckpt, tmp_path / "w.onnx", weights="int4", latency=False, opset=21)
    ops = _ops(tmp_path / "w.onnx")
    assert report["ok"] and "com.microsoft::Attention" not in ops and ops["com.microsoft::SkipLayerNormalization"]
    assert ops["com.microsoft::MatMulNBits"] == 4 * 6  # q, k, v, attention out, MLP in and out of 4 layers
    assert "Attention not fused" in report["fusion"]


def test_quantized_models_fuse_around_their_own_kernels(tiny_dirs, tmp_path):
    """Dynamic int8: LayerNorm/GELU fusions, validated by the quantized rule. Static int8 with
    squeeze's quantized attention: that attention is kept (switching it to eager attention would
    silently export a model without it), and said so."""
    from squeeze.compress.calibration import DataSpec
    from squeeze.compress.passes import PassContext, run_pass
    from squeeze.compress.passes.quantize import QuantizeConfig, QuantizePass

    ckpt = ck.load(tiny_dirs["bert"])
    spec = DataSpec(samples=8, seq_len=16, batch_size=4)
    for acts in ("dynamic", "int8"):
        cfg = QuantizeConfig(activations=acts, clip_steps=2)
        quant = run_pass(QuantizePass(cfg), [ckpt], PassContext(family=ckpt.family, checkpoint=ckpt, calibration=spec))
        out = tmp_path / f"{acts}.onnx"
        report = export_model(quant, out, latency=False)
        assert report["ok"] and report["fusion"].startswith("fused:") and "rule" in report["validation"][0]
        if acts == "int8":
            assert "attention kept as 'squeeze_quant'" in report["fusion"]
            assert "squeeze::LogSqrt2Softmax" in _ops(out)  # the quantized softmax is in the graph


@pytest.mark.parametrize(("field", "fused"), [("", True), ("{optimize: false, latency: false}", False)])
def test_recipe_export_step_fuses_by_default_and_takes_optimize(tiny_dirs, tmp_path, field, fused):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\ndefaults:\n  calibration: {source: builtin, samples: 4, eval_samples: 4, seq_len: 16}\n"
        f"jobs:\n  - name: a\n    model: {tiny_dirs['bert']}\n    steps:\n      - export: {field or '{latency: false}'}\n"
    )
    out = tmp_path / "out"
    assert main(["run", str(recipe), "-o", str(out)]) == 0
    (graph,) = out.glob("a/*/model.onnx")
    assert bool([k for k in _ops(graph) if k.startswith("com.microsoft")]) is fused
