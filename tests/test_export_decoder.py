"""The KV-cache decoder graph (text-generation-with-past): Optimum's names and layout, greedy
tokens equal to transformers' generate, pruned caches, quantized decoders, a broken cache caught."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from squeeze.cli.main import main
from squeeze.compress import checkpoint as ck
from squeeze.compress.calibration import DataSpec
from squeeze.compress.errors import ValidationFailed
from squeeze.compress.export import compare
from squeeze.compress.export_decoder import cache_layout, prompts, validate_generation
from squeeze.compress.export_folder import export_model
from squeeze.compress.passes import PassContext, run_pass
from squeeze.compress.passes.prune import PrunePass

SPEC = DataSpec(samples=8, seq_len=16, batch_size=4, eval_samples=4)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_cli_default_is_the_kv_cache_graph_and_generates_like_transformers(name, tiny_dirs, tmp_path):
    out = tmp_path / "m.onnx"
    assert main(["export", str(tiny_dirs[name]), "-o", str(out)]) == 0
    report = json.loads((tmp_path / "m.onnx.report.json").read_text())
    gen = report["generation"]
    assert report["task"] == "text-generation-with-past" and gen["tokens_equal"] and gen["new_tokens"] == 32
    assert gen["left_padded_rows"] == 1 and len(gen["ort_tokens"][0]) == 32  # padding and positions exercised
    assert [c["ok"] for c in gen["checks"]] == [True, True]  # prefill and decode logits, not just argmax
    graph = onnx.load(str(out)).graph
    layers = 4
    want_in = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")
    ]
    assert [i.name for i in graph.input] == want_in
    assert [o.name for o in graph.output] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")
    ]
    heads = 2 if name == "llama" else 4  # llama: grouped-query attention, 2 KV heads
    assert _dims(graph.input[3]) == ["batch_size", heads, "past_sequence_length", 8]
    assert _dims(graph.output[1]) == ["batch_size", heads, "past_sequence_length + sequence_length", 8]
    assert _dims(graph.input[1]) == ["batch_size", "past_sequence_length + sequence_length"]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_pruned_attention_layers_have_no_cache_tensors(name, tiny_dirs, tmp_path):
    ckpt = ck.load(tiny_dirs[name])
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)
    pruned = run_pass(PrunePass(attn_layers=[1, 3], mlp_layers=[2]), [ckpt], ctx, measure_fidelity=False)
    report = export_model(pruned, tmp_path / "p.onnx", latency=False)
    assert report["ok"] and report["generation"]["tokens_equal"] and report["cache_slots"] == [2]
    names = [i.name for i in onnx.load(str(tmp_path / "p.onnx")).graph.input]
    assert names[3:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]


def test_whole_block_drop_exports_a_shorter_cache(tiny_dirs, tmp_path):
    ckpt = ck.load(tiny_dirs["llama"])
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)
    pruned = run_pass(PrunePass(block_layers=[0]), [ckpt], ctx, measure_fidelity=False)
    report = export_model(pruned, tmp_path / "b.onnx", latency=False)
    assert report["generation"]["tokens_equal"] and report["cache_slots"] == [3]


def test_quantized_decoder_generates_like_its_pytorch_twin(tiny_dirs, tmp_path):
    from squeeze.compress.passes.quantize import QuantizeConfig, QuantizePass

    ckpt = ck.load(tiny_dirs["gpt2"])
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)
    quant = run_pass(QuantizePass(QuantizeConfig()), [ckpt], ctx)
    report = export_model(quant, tmp_path / "q.onnx", latency=False)
    assert report["ok"] and report["generation"]["tokens_equal"]
    assert "min_cosine" in report["rule"]  # judged by the quantized rule, not fp32 tolerances
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger"}


class _ForgetfulSession:
    """A graph that drops its cache: present.* comes back as it went in."""

    def __init__(self, session):
        self.session = session

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, feeds):
        outs = self.session.run(names, feeds)
        for i, o in enumerate(self.session.get_outputs()):
            if o.name.startswith("present."):
                src = feeds["past_key_values." + o.name[len("present.") :]]
                pad = np.zeros((*src.shape[:2], outs[i].shape[2] - src.shape[2], src.shape[3]), src.dtype)
                outs[i] = np.concatenate([src, pad], axis=2)
        return outs


def test_a_graph_that_loses_its_cache_fails_validation(tiny_dirs, tmp_path):
    from squeeze.compress.evaluate import ort_session

    ckpt = ck.load(tiny_dirs["llama"])
    export_model(ckpt, tmp_path / "m.onnx", latency=False)
    session = _ForgetfulSession(ort_session(tmp_path / "m.onnx"))
    ids, mask, pad = prompts(ckpt, 12)

    def judge(got, want, name):
        return compare(name, got, want, 1e-4, 1e-3)

    gen = validate_generation(
        session, ckpt.model, cache_layout(ckpt.model), ids, mask, pad, new=8, dtype=np.float32, judge=judge
    )
    assert not gen["ok"] and not gen["checks"][-1]["ok"]  # the decode steps disagree


def test_corrupted_decoder_graph_is_rejected(tiny_dirs, tmp_path, monkeypatch):
    import squeeze.kernels.registry as kreg

    real = kreg.finalize_onnx

    def corrupt(model, plain=False):  # one key projection of layer 0 perturbed
        model = real(model, plain=plain)
        init = next(t for t in model.graph.initializer if t.dims == [32, 16])
        arr = onnx.numpy_helper.to_array(init).copy() * 1.5
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        return model

    monkeypatch.setattr(kreg, "finalize_onnx", corrupt)
    with pytest.raises(ValidationFailed, match="validation failed"):
        export_model(ck.load(tiny_dirs["llama"]), tmp_path / "bad.onnx", latency=False)
    assert not (tmp_path / "bad.onnx").exists() and (tmp_path / "bad.rejected.onnx").exists()


def test_merged_decoder_carries_one_cache_per_expert(tiny_dirs, tmp_path):
    import shutil

    from tiny import build_tiny

    from squeeze.compress.passes import get_pass

    other = tmp_path / "b"
    build_tiny("llama", seed=1).save_pretrained(str(other))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dirs["llama"] / name, other / name)
    first = ck.load(tiny_dirs["llama"])
    ctx = PassContext(family=first.family, calibration=SPEC)
    merged = run_pass(get_pass("merge")(), [first, ck.load(other)], ctx, measure_fidelity=False)
    report = export_model(merged, tmp_path / "m.onnx", latency=False)
    assert report["ok"] and report["generation"]["tokens_equal"] and report["cache_slots"] == [4, 4]
    names = [i.name for i in onnx.load(str(tmp_path / "m.onnx")).graph.input]
    assert names[-1] == "past_key_values.7.value"
