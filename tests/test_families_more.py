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
    assert len(fam.linears(fam.layers(model)[0])) == 6 + (name == "gemma")  # q k v o in out (+ gate)


@pytest.mark.parametrize("keep_norm", [False, True])
@pytest.mark.parametrize("name", ["roberta", "mpnet", "distilbert", "gemma"])
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
