"""The fc2 switch (issue 17): the per-channel reparameterization of the MLP output linear's input,
squeeze's extension beyond RepQ-ViT, is an explicit option of static repquant (``fc2_reparam``,
``--fc2-reparam/--no-fc2-reparam``), recorded in the ledger only when it runs."""

from __future__ import annotations

import copy

import pytest
import torch

from squeeze.compress import checkpoint as ck
from squeeze.compress.calibration import DataSpec
from squeeze.compress.passes import PassContext, run_pass
from squeeze.compress.passes.quantize import QuantizeConfig, QuantizePass, engine, names, uniform

SPEC = DataSpec(samples=8, seq_len=16, batch_size=4, eval_samples=4)
FOLD_TOL = 1e-6  # fold-only (the engine's affine and bias, W' = W diag(r)) vs float, relative; measured 2e-7
CODE_FLIPS = 2  # codes recomputed from float32 W diag(1 / (1 / r)): a .5 tie may flip; measured 0
BIAS_TOL = 1e-5  # b' = b + W' delta recomputed in float32 vs the engine's; measured 1e-6


def _scheme(fc2: bool) -> engine.Scheme:
    return engine.Scheme(
        w_bits=8,
        act="static",
        a_bits=4,
        method="repquant",
        gptq=False,  # round to nearest: the codes can be recomputed from the stored grid
        block_size=32,
        embeddings=False,
        clip_steps=0,
        alphas=(0.0,),
        softmax="float",
        fc2_reparam=fc2,
    )


def _codes(w: torch.Tensor, q) -> torch.Tensor:
    return uniform.quantize_weight(w, q.w_scale, q.w_zero.float(), uniform.weight_grid(q.w_bits))


def _outputs(model, fam, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [model(**{k: v for k, v in b.items() if k in fam.model_inputs}).last_hidden_state for b in batches]
        )


@pytest.mark.parametrize("fc2", [True, False])
@pytest.mark.parametrize("name", ["vit", "bert"])
def test_fc2_switch_decides_what_the_mlp_output_linear_holds(tiny_dirs, name, fc2):
    """On: fc2 holds the codes of W diag(r) and b + W' delta behind a ChannelAffine (1 / r, -delta),
    and folding that affine into a float model gives the float outputs. Off: fc2 holds the codes of
    its own W and bias, no affine. Catches: the switch ignored (either way), the affine's shift sign,
    the bias fold with W instead of W'."""
    ckpt = ck.load(tiny_dirs[name])
    fam = ckpt.family
    batches = PassContext(family=fam, checkpoint=ckpt, calibration=SPEC).calib_batches()
    qmodel = copy.deepcopy(ckpt.model)
    _, metrics = engine.quantize_model(qmodel, fam, batches, _scheme(fc2))
    folded = copy.deepcopy(ckpt.model)
    hooks = []
    for i, (layer, qlayer, flayer) in enumerate(zip(fam.layers(ckpt.model), fam.layers(qmodel), fam.layers(folded))):
        lin = fam.linears(layer)["mlp_out"]
        w, b = fam.linear_weight(lin).detach().float(), lin.bias.detach().float()
        q = fam.linears(qlayer)["mlp_out"]
        if not fc2:
            assert q.affine is None and metrics["groups"][f"{i}.mlp_out"]["where"] == "none"
            assert torch.equal(q.qweight.float(), _codes(w, q))
            assert torch.equal(q.bias, b)
            continue
        assert q.affine is not None and metrics["groups"][f"{i}.mlp_out"]["where"] == "affine"
        r, delta = 1.0 / q.affine.scale, -q.affine.shift
        assert float((r - 1).abs().max()) > 0.1 and float(delta.abs().max()) > 0  # a real transform
        w_fold = w * r[None, :]
        assert int((q.qweight.float() != _codes(w_fold, q)).sum()) <= CODE_FLIPS
        assert int((q.qweight.float() != _codes(w, q)).sum()) > w.numel() // 4  # the fold changed the codes
        assert torch.allclose(q.bias, b + w_fold @ delta, rtol=0, atol=BIAS_TOL)
        flin = fam.linears(flayer)["mlp_out"]
        fam.set_linear_weight(flin, w_fold)
        with torch.no_grad():
            flin.bias.copy_(q.bias)
        hooks.append(flin.register_forward_pre_hook(lambda m, a, aff=q.affine: (aff(a[0]),)))
    if fc2:
        want, got = _outputs(ckpt.model, fam, batches), _outputs(folded, fam, batches)
        assert float((got - want).abs().max()) < FOLD_TOL * float(want.abs().max())
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("fc2", [True, False])
def test_the_pass_records_the_extension_only_when_it_runs(tiny_dirs, fc2):
    """Through the pass (static W8A4 on BERT): the config reaches the engine and the ledger names
    squeeze's extension only when the fc2 input was reparameterized."""
    ckpt = ck.load(tiny_dirs["bert"])
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)
    cfg = QuantizeConfig(activations="int4", clip_steps=0, gptq=False, fc2_reparam=fc2)
    new = run_pass(QuantizePass(cfg), [ckpt], ctx, measure_fidelity=False)
    metrics = new.manifest.ledger[-1]["metrics"]
    assert metrics["scheme"]["algorithm"] == "repquant+rtn"
    assert metrics["scheme"]["extensions"] == ([names.MLP_OUT_EXTENSION] if fc2 else [])
    wheres = {k: v["where"] for k, v in metrics["groups"].items() if k.endswith("mlp_out")}
    assert set(wheres.values()) == ({"affine"} if fc2 else {"none"})
    assert {v["where"] for k, v in metrics["groups"].items() if k.endswith("mlp_in")} == {"affine"}  # post-LN BERT
    assert names.extensions("repquant", "static", fc2_reparam=False) == []


def test_the_cli_flag_reaches_the_config(monkeypatch, tiny_dirs, tmp_path):
    """``--no-fc2-reparam`` sets the config field (the default is on)."""
    import squeeze.cli.cmd_quantize as cmd
    from squeeze.cli.main import main
    from squeeze.compress.errors import SqueezeError

    seen = {}
    build = cmd._config

    def spy(**kw):
        seen["cfg"] = build(**kw)
        raise SqueezeError("stop here")

    monkeypatch.setattr(cmd, "_config", spy)
    for flag, want in (("--no-fc2-reparam", False), ("--fc2-reparam", True)):
        argv = ["quantize", str(tiny_dirs["bert"]), "-o", str(tmp_path / "q"), "--activations", "int8", flag]
        assert main(argv) == 2
        assert seen.pop("cfg").fc2_reparam is want
    assert QuantizeConfig().fc2_reparam is True


def test_the_recipe_field_reaches_the_config(tiny_dirs):
    from squeeze.compress.recipe import parse_recipe

    text = f"""
version: 1
jobs:
  - name: q
    model: {tiny_dirs["bert"]}
    steps:
      - quantize: {{activations: int8, fc2_reparam: false}}
      - quantize: {{activations: int8}}
"""
    off, on = parse_recipe(text).jobs[0].steps
    assert (off.config.fc2_reparam, on.config.fc2_reparam) == (False, True)
