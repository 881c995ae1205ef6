"""The families added for issue 14: roberta, xlm-roberta, mpnet, distilbert, gemma.

Each goes prune -> quantize -> export on a tiny model; skipping both sublayers of a layer makes
it the identity; the folders reload bit-identically."""

from __future__ import annotations

import pytest
import torch
from tiny_more import MORE, build_tiny_more, make_tiny_more

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import family_for, model_class
from squeeze.compress.run import apply, load

EXPECTED_FAMILY = {
    "roberta": "bert",
    "xlm-roberta": "bert",
    "mpnet": "mpnet",
    "distilbert": "distilbert",
    "gemma": "gemma",
    "phi3": "phi3",
}


@pytest.fixture(scope="module")
def more_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("more")
    return {name: make_tiny_more(name, root / name) for name in MORE}


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _out(ckpt) -> torch.Tensor:
    o = ckpt.family.forward(ckpt.model, _batch())
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


@pytest.mark.parametrize("name", sorted(MORE))
def test_family_table_and_class(name):
    model = build_tiny_more(name)
    fam = family_for(model.config.model_type)
    assert fam.name == EXPECTED_FAMILY[name]
    assert model_class(fam, model.config) is type(model)
    model.config.architectures = None  # the per-model_type default class, never BERT's for roberta
    assert model_class(fam, model.config) is type(model)
    want = {"gemma": 7, "phi3": 4}.get(name, 6)  # q k v o in out (+ gate); phi3: qkv o gate_up down
    assert len(fam.linears(fam.layers(model)[0])) == want


@pytest.mark.parametrize("keep_norm", [False, True])
@pytest.mark.parametrize("name", ["roberta", "mpnet", "distilbert", "gemma", "phi3"])
def test_skipping_both_sublayers_makes_a_layer_the_identity(name, keep_norm):
    model = build_tiny_more(name, layers=2)
    fam = family_for(model.config.model_type)
    if keep_norm and fam.norm_placement == "pre":
        pytest.skip("pre-norm: a dropped sublayer takes its norm with it")
    layer = fam.layers(model)[0]
    norms = [fam.role(layer, "attn_norm"), fam.role(layer, "mlp_norm")]
    fam.skip_sublayer(layer, "attn", keep_norm=keep_norm)
    fam.skip_sublayer(layer, "mlp", keep_norm=keep_norm)
    assert fam.is_skipped(layer, "attn") and fam.is_skipped(layer, "mlp") and not fam.linears(layer)
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = layer(h)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.equal(out, norms[1](norms[0](h)) if keep_norm else h)


@pytest.mark.parametrize("name", sorted(MORE))
def test_prune_quantize_export_and_exact_reload(tmp_path, more_dirs, name):
    from squeeze.compress.export import export_onnx

    pruned = apply(more_dirs[name], {"prune": {"attn_layers": [1], "mlp_layers": [2]}}, out=tmp_path / "p")
    res = pruned.manifest.edits[-1]["result"]
    assert len(res["attention"]) == 1 and len(res["mlp"]) == 1
    quant = apply(tmp_path / "p", {"quantize": {"weights": "int8", "gptq": False}}, out=tmp_path / "q")
    back = load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(_out(quant), _out(back))
    assert quant.manifest.ledger[-1]["fidelity"]["cos_mean"] > 0.98  # measured 0.9999+ (int8 per channel)
    report = export_onnx(back, tmp_path / "q.onnx", latency=False)
    assert report["validation"] and all(c.get("ok", True) for c in report["validation"])


def test_mpnet_static_activations_are_refused_before_any_work(tmp_path, more_dirs):
    with pytest.raises(SqueezeError, match="AttentionInterface"):
        apply(more_dirs["mpnet"], {"quantize": {"activations": "int8"}}, out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_phi3_fused_qkv_splits_where_its_attention_slices_it():
    """Grouped-query phi3: q takes heads * head_dim rows of qkv_proj, k and v kv_heads * head_dim each."""
    model = build_tiny_more("phi3")
    fam = family_for("phi3")
    layer = fam.layers(model)[0]
    q, k, v = fam.split_qkv(layer)
    assert (q.out_features, k.out_features, v.out_features) == (32, 16, 16)  # 4 heads, 2 KV heads, head_dim 8
    x = torch.randn(3, 32)
    with torch.no_grad():
        fused = fam.role(layer, "qkv")(x)
        torch.testing.assert_close(torch.cat([q(x), k(x), v(x)], -1), fused)
    fam.pack_qkv(layer, q, k, v)
    with torch.no_grad():
        assert torch.equal(fam.role(layer, "qkv")(x), fused)


def test_phi3_static_activations_and_compressed_tensors(tmp_path, more_dirs):
    """Static int8 goes through phi3's AttentionInterface; weight-only int8 of its fused linears
    is written as compressed-tensors and plain transformers computes the twin's logits."""
    pytest.importorskip("compressed_tensors")
    import transformers as T

    from squeeze.compress.calibration import DataSpec

    data = DataSpec(source="builtin", samples=8, seq_len=16, eval_samples=8)
    step = {"quantize": {"activations": "int8", "gptq": False, "clip_steps": 5}}
    static = apply(more_dirs["phi3"], step, out=tmp_path / "s", data=data)
    assert static.manifest.edits[-1]["result"]["attention"]["layers"] == [0, 1, 2, 3]
    assert static.manifest.ledger[-1]["fidelity"]["cos_mean"] > 0.95  # measured 0.998 (W8A8 static, 8 samples)
    with torch.no_grad():
        assert torch.equal(_out(static), _out(load(tmp_path / "s")))
    step = {"quantize": {"activations": "none", "gptq": False, "format": "compressed-tensors"}}
    twin = apply(more_dirs["phi3"], step, out=tmp_path / "ct", data=data)
    plain = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**_batch()).logits, _out(twin), atol=1e-5, rtol=0)  # measured 0.0


def test_mpnet_layers_are_captured_with_their_real_inputs():
    """MPNet's encoder takes ``layer(...)[0]``: the capture's stand-in returns a tuple there, or
    every later layer sees a slice of the batch (a 12-layer mpnet then fails in the 4th layer)."""
    from squeeze.compress.capture import layer_calls

    model = build_tiny_more("mpnet", layers=6)
    calls = layer_calls(model, family_for("mpnet"), [_batch()])
    assert [tuple(c[0].args[0].shape) for c in calls] == [(2, 12, 32)] * 6
