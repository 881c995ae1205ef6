"""The family table: every role resolves to a real module on every tiny model, and the
family-specific operations are exact."""

from __future__ import annotations

import pytest
import torch
from tiny import build_tiny
from tiny_more import MORE, build_tiny_more
from torch import nn

from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import FAMILIES, Family, family_for, supported_model_types

ROLES = ("attn", "mlp", "attn_norm", "mlp_norm", "attn_out", "mlp_in", "mlp_out")


def _build(name: str) -> nn.Module:
    """A tiny model of any family in the table (tests/tiny_more.py holds the issue-14 families)."""
    return build_tiny_more(name) if name in MORE else build_tiny(name)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_role_resolves(name):
    fam = FAMILIES[name]
    model = _build(name)
    layers = fam.layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == model.config.num_hidden_layers
    for layer in layers:
        for role in ROLES:
            mods = fam.role(layer, role)
            for m in mods if isinstance(mods, tuple) else (mods,):
                assert isinstance(m, nn.Module), (name, role)
        for role in ("q", "k", "v") if fam.roles["qkv"] is None else ("qkv",):
            assert fam.is_linear(fam.role(layer, role)), (name, role)
        hidden = model.config.hidden_size
        assert fam.linear_weight(fam.role(layer, "attn_out")).shape[0] == hidden
        assert fam.linear_weight(fam.role(layer, "mlp_out")).shape[0] == hidden
    assert all(isinstance(m, nn.Module) for m in fam.embedding_modules(model))
    if fam.final_norm:
        assert isinstance(fam.final_norm_module(model), nn.Module)
    if fam.causal:
        assert isinstance(fam.head_module(model), nn.Linear)


NORM_TOL = 1e-5  # a norm's output for x and for a shifted / scaled x: fp32, measured within 2e-6


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_norm_kind_is_what_the_norms_compute(name):
    """``norm_kind`` and the norm roles name modules that normalise the way the table says:
    LayerNorm subtracts the mean (its output ignores a constant shift), RMSNorm does not; both
    ignore a positive scale. Folds and quantization choose their formulas by this field."""
    torch.manual_seed(0)
    fam = FAMILIES[name]
    model = _build(name)
    layer = fam.layers(model)[0]
    norms = [fam.role(layer, "attn_norm"), fam.role(layer, "mlp_norm"), fam.final_norm_module(model)]
    for norm in (n for n in norms if n is not None):
        with torch.no_grad():
            for p in norm.parameters():  # away from the initial 1 / 0 so the affine part counts
                p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(3, 7, model.config.hidden_size)
        with torch.no_grad():
            ref, shifted, scaled = norm(x), norm(x + 3.0), norm(x * 4.0)
        torch.testing.assert_close(scaled, ref, atol=NORM_TOL, rtol=NORM_TOL)
        ignores_shift = torch.allclose(shifted, ref, atol=NORM_TOL, rtol=NORM_TOL)
        assert ignores_shift == (fam.norm_kind == "layernorm"), (name, type(norm).__name__)


def test_linear_weight_is_out_in_for_conv1d():
    fam = FAMILIES["gpt2"]
    layer = fam.layers(build_tiny("gpt2"))[0]
    mlp_in = fam.role(layer, "mlp_in")[0]
    w = fam.linear_weight(mlp_in)
    x = torch.randn(5, w.shape[1])
    torch.testing.assert_close(mlp_in(x), x @ w.T + mlp_in.bias)
    lin = Family.as_linear(mlp_in)
    torch.testing.assert_close(lin(x), mlp_in(x))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_split_and_pack_qkv_round_trip(name):
    fam = FAMILIES[name]
    layer = fam.layers(_build(name))[0]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    q, k, v = fam.split_qkv(layer)
    assert q.weight.shape[1] == k.weight.shape[1] == v.weight.shape[1]
    with torch.no_grad():
        for lin in (q, k, v):
            lin.weight.mul_(2)
    fam.pack_qkv(layer, q, k, v)
    fam.pack_qkv(layer, *(_halve(t) for t in fam.split_qkv(layer)))
    after = layer.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def _halve(lin):
    with torch.no_grad():
        lin.weight.mul_(0.5)
    return lin


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("which", ["attn", "mlp"])
def test_skipped_sublayer_is_the_identity_branch(name, which):
    """After skip_sublayer, the layer computes h_out = h_in for that branch exactly."""
    fam = FAMILIES[name]
    model = _build(name)
    layer = fam.layers(model)[1]
    fam.skip_sublayer(layer, which)
    assert fam.is_skipped(layer, which)
    other = "mlp" if which == "attn" else "attn"
    fam.skip_sublayer(layer, other)
    # both branches skipped: the whole layer is the identity on the residual stream
    h = torch.randn(2, 5, model.config.hidden_size)
    kwargs = {}
    if fam.causal:
        base = fam.base(model)
        pos = torch.arange(5)[None]
        kwargs["position_embeddings"] = base.rotary_emb(h, pos) if hasattr(base, "rotary_emb") else None
        if kwargs["position_embeddings"] is None:
            kwargs.pop("position_embeddings")
    out = layer(h, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.equal(out, h)


def test_keep_norm_only_for_post_ln():
    layer = FAMILIES["llama"].layers(build_tiny("llama"))[0]
    with pytest.raises(SqueezeError, match="pre-norm"):
        FAMILIES["llama"].skip_sublayer(layer, "attn", keep_norm=True)


def test_unknown_model_type_lists_supported():
    with pytest.raises(SqueezeError) as err:
        family_for("t5")
    for mt in supported_model_types():
        assert mt in str(err.value)
    assert family_for("deit").name == "vit" and family_for("qwen2").name == "llama"
