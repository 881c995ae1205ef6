"""``prune`` (LLM-Drop): the exact invariants of ALGORITHMS.md section 1, on every family.

(a) a dropped sublayer equals its whole residual branch zeroed; (b) a zero output projection
scores S = 1 and goes first; (c) generation with the KV cache equals generation without it;
(d) index lists and boolean masks round-trip through the manifest; (e) joint indices map back.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import transformers
from conftest import FAMILIES

import squeeze.compress as ck  # load = run.load (replays squeeze folders), save = checkpoint.save
from squeeze.cli.main import main
from squeeze.compress.calibration import DataSpec
from squeeze.compress.errors import SqueezeError
from squeeze.compress.evaluate import model_outputs
from squeeze.compress.families import family_for
from squeeze.compress.passes import Edit, PassContext, run_pass
from squeeze.compress.passes.prune import (
    POST_LN_KEEP_NORM,
    Plan,
    PruneConfig,
    PrunePass,
    layer_scores,
    rank_joint,
    to_indices,
    to_mask,
)
from squeeze.compress.run import apply

SPEC = DataSpec(samples=8, seq_len=16, batch_size=4, eval_samples=4)
S_ONE_TOL = 1e-6  # a zero o_proj gives h' == h bit for bit; cos(h, h) in fp32 measured within 6e-8 of 1
SCORE_TOL = 1e-5  # layer-by-layer vs full-forward S: same fp32 ops, different batching; measured 3e-7


def _ctx(ckpt) -> PassContext:
    return PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)


def _outputs(model, family, batch):
    return next(iter(model_outputs(model, family, batch).values()))


def _eval_batch(ckpt):
    return _ctx(ckpt).eval_batches()[0]


# --------------------------------------------------------------------------------------------
# (a) dropped == residual branch zeroed, every family, both sublayers (and BERT's two norms)
# --------------------------------------------------------------------------------------------


def _zero_branch_reference(model, family, k: int, which: str, keep_norm: bool | None):
    """The unpruned model with layer k's ``which`` residual branch forced to contribute zero."""
    layer = family.layers(model)[k]
    if family.norm_placement == "pre":  # branch = norm + module; zero the module's output
        mod = family.role(layer, which)
        mod = mod[-1] if isinstance(mod, tuple) else mod
        mod.register_forward_hook(
            lambda m, a, out: (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)
        )
    elif keep_norm:  # post-LN, norm kept: LN(h + 0)
        family.role(layer, "attn_out" if which == "attn" else "mlp_out").register_forward_hook(
            lambda m, a, out: torch.zeros_like(out)
        )
    elif which == "attn":  # post-LN, norm gone too: the block returns its input
        family.role(layer, "attn").register_forward_hook(lambda m, a, out: (a[0], *out[1:]))
    else:
        family.role(layer, "mlp")[-1].register_forward_hook(lambda m, a, out: a[1])
    return model


@pytest.mark.parametrize("which", ["attn", "mlp"])
@pytest.mark.parametrize("name,keep_norm", [(f, None) for f in FAMILIES] + [("bert", False)])
def test_dropped_sublayer_equals_zeroed_branch(tiny_dirs, name, keep_norm, which):
    ckpt = ck.load(tiny_dirs[name])
    fam, k = ckpt.family, 1
    key = "attn_layers" if which == "attn" else "mlp_layers"
    pruned = run_pass(PrunePass(**{key: [k], "keep_norm": keep_norm}), [ckpt], _ctx(ckpt), measure_fidelity=False)
    kn = POST_LN_KEEP_NORM if keep_norm is None else keep_norm
    ref = _zero_branch_reference(copy.deepcopy(ckpt.model), fam, k, which, kn if fam.norm_placement == "post" else None)
    batch = _eval_batch(ckpt)
    got, want, orig = (_outputs(m, fam, batch) for m in (pruned.model, ref, ckpt.model))
    assert torch.equal(got, want)
    assert not torch.equal(got, orig)  # the drop did something
    assert fam.is_skipped(fam.layers(pruned.model)[k], which)
    assert not fam.is_skipped(fam.layers(ckpt.model)[k], which)  # the input model is untouched


def test_drop_nothing_is_the_identity(tiny_dirs):
    kws = ({"drop_attn": 0}, {"drop_joint": 0.05}, {"attn_layers": []}, {"drop_blocks": 0.1})  # 0.05 x 8, 0.1 x 4 -> 0
    for name, kw in zip(FAMILIES, kws):
        ckpt = ck.load(tiny_dirs[name])
        new = run_pass(PrunePass(**kw), [ckpt], _ctx(ckpt), measure_fidelity=False)
        batch = _eval_batch(ckpt)
        assert torch.equal(_outputs(new.model, ckpt.family, batch), _outputs(ckpt.model, ckpt.family, batch))
        assert new.model.state_dict().keys() == ckpt.model.state_dict().keys()
        res = new.manifest.edits[-1]["result"]
        assert res["attention"] == res["mlp"] == res["blocks"] == []


# --------------------------------------------------------------------------------------------
# (b) scores: S = 1 for a zero output projection; layer-by-layer equals a full forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_out_proj_scores_one_and_goes_first(tiny_dirs, name):
    ckpt = ck.load(tiny_dirs[name])
    fam, k = ckpt.family, 2
    layers = fam.layers(ckpt.model)
    with torch.no_grad():
        out = fam.role(layers[k], "attn_out")
        out.weight.zero_()
        out.bias.zero_() if out.bias is not None else None
        if fam.norm_placement == "post":
            # BERT: the block returns LN_k(h); with unit gain and zero bias here and in the LayerNorm
            # that produced h, LN_k(h) == h up to eps, so S is 1 as in pre-norm models.
            for norm in (fam.role(layers[k], "attn_norm"), fam.role(layers[k - 1], "mlp_norm")):
                norm.weight.fill_(1.0)
                norm.bias.zero_()
    plan = PrunePass(drop_attn=1).plan(ckpt.model, _ctx(ckpt))
    assert abs(plan.scores["attn"][k] - 1.0) < S_ONE_TOL
    assert plan.attention == [k]
    assert max(s for i, s in enumerate(plan.scores["attn"]) if i != k) < 1.0 - 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_by_layer_scores_equal_full_forward(tiny_dirs, name):
    """Block S (and the consecutive span S) from the layer-by-layer loop equal cosines of the
    full model's hidden states, with padding masked (BERT batches are padded)."""
    ckpt = ck.load(tiny_dirs[name])
    fam = ckpt.family
    spec = SPEC.model_copy(update={"seq_len": 128})  # long enough that BERT rows are padded
    batches = PassContext(family=fam, checkpoint=ckpt, calibration=spec).calib_batches()
    if name == "bert":
        assert not all(bool(b["attention_mask"].all()) for b in batches)
    scores = layer_scores(ckpt.model, fam, batches, span=2)
    sums = torch.zeros(fam.num_layers(ckpt.model) + 1, dtype=torch.float64)
    span = torch.zeros_like(sums)
    count = 0
    with torch.no_grad():
        for b in batches:
            kw = {k: v for k, v in b.items() if k in fam.model_inputs}
            hs = ckpt.model(
                **kw, output_hidden_states=True, **({"use_cache": False} if fam.causal else {})
            ).hidden_states
            mask = (
                b["attention_mask"].bool() if "attention_mask" in b else torch.ones(hs[0].shape[:2], dtype=torch.bool)
            )
            for i in range(len(hs) - 2):  # the last entry may carry the final norm
                sums[i] += torch.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1)[mask].double().sum()
                if i + 2 < len(hs) - 1:
                    span[i] += torch.cosine_similarity(hs[i].float(), hs[i + 2].float(), dim=-1)[mask].double().sum()
            count += int(mask.sum())
    n = fam.num_layers(ckpt.model)
    for i in range(n - 1):
        assert abs(scores["block"][i] - float(sums[i] / count)) < SCORE_TOL
    for i in range(n - 2):
        assert abs(scores["span"][i] - float(span[i] / count)) < SCORE_TOL
    assert len(scores["span"]) == n - 1


def test_iterative_rescores_after_each_drop(tiny_dirs):
    ckpt = ck.load(tiny_dirs["llama"])
    fam = ckpt.family
    plan = PrunePass(drop_attn=2, iterative=True).plan(ckpt.model, _ctx(ckpt))
    first, second = plan.rounds
    assert first["layer"] == max(range(4), key=lambda i: plan.scores["attn"][i])
    work = copy.deepcopy(ckpt.model)
    fam.skip_sublayer(fam.layers(work)[first["layer"]], "attn")
    again = layer_scores(work, fam, _ctx(ckpt).calib_batches())
    assert again["attn"][first["layer"]] == -math.inf
    assert second["layer"] == max(range(4), key=lambda i: again["attn"][i])
    assert abs(second["S"] - again["attn"][second["layer"]]) < 1e-6
    assert plan.attention == sorted([first["layer"], second["layer"]])
    assert not any(fam.is_skipped(layer, "attn") for layer in fam.layers(ckpt.model))  # scored on a copy


# --------------------------------------------------------------------------------------------
# (e) joint ranking, (d) manifest forms
# --------------------------------------------------------------------------------------------


def test_joint_ranking_maps_indices_back():
    attn, mlp = rank_joint([0.1, 0.9, 0.3, 0.2], [0.95, 0.2, 0.5, 0.92], 3)
    assert (attn, mlp) == ([1], [0, 3])  # merged list [.1 .9 .3 .2 | .95 .2 .5 .92]: picks 4, 7, 1
    assert rank_joint([0.5, 0.5], [0.5, 0.5], 3) == ([0, 1], [0])  # ties: lower merged index first


def test_joint_drop_end_to_end(tiny_dirs):
    ckpt = ck.load(tiny_dirs["llama"])
    fam = ckpt.family
    layers = fam.layers(ckpt.model)
    with torch.no_grad():
        fam.role(layers[1], "attn_out").weight.zero_()
        fam.role(layers[3], "mlp_out").weight.zero_()
    new = run_pass(PrunePass(drop_joint=2), [ckpt], _ctx(ckpt), measure_fidelity=False)
    res = new.manifest.edits[-1]["result"]
    assert (res["attention"], res["mlp"]) == ([1], [3])


def test_manifest_lists_and_masks_round_trip(tiny_dirs, tmp_path):
    assert to_indices(to_mask([0, 2], 4), 4, "x") == [0, 2]
    assert to_mask(to_indices([True, False, True, False], 4, "x"), 4) == [True, False, True, False]
    ckpt = ck.load(tiny_dirs["gpt2"])
    new = run_pass(PrunePass(attn_layers=[0, 2], mlp_layers=[3]), [ckpt], _ctx(ckpt), measure_fidelity=False)
    out = ck.save(new, tmp_path / "lists")
    manifest = json.loads((out / "squeeze.json").read_text())
    res = manifest["edits"][0]["result"]
    res["attention"], res["mlp"] = to_mask(res["attention"], 4), to_mask(res["mlp"], 4)
    (out / "squeeze.json").write_text(json.dumps(manifest))
    batch = _eval_batch(ckpt)
    assert torch.equal(_outputs(ck.load(out).model, ckpt.family, batch), _outputs(new.model, ckpt.family, batch))
    with pytest.raises(SqueezeError, match="boolean mask needs 4 entries"):
        to_indices([True, False], 4, "attention")


@pytest.mark.parametrize("kw", [{"drop_attn": 0.5}, {"drop_mlp": 1, "iterative": True}, {"drop_blocks": 2}])
def test_saved_checkpoint_reloads_exactly(tiny, tmp_path, kw):
    _name, folder = tiny
    ckpt = ck.load(folder)
    new = run_pass(PrunePass(**kw), [ckpt], _ctx(ckpt), measure_fidelity=False)
    out = ck.save(new, tmp_path / "out")
    back = ck.load(out)
    batch = _eval_batch(ckpt)
    assert torch.equal(_outputs(back.model, ckpt.family, batch), _outputs(new.model, ckpt.family, batch))
    saved = json.loads((out / "squeeze.json").read_text())
    assert saved["edits"][0]["pass"] == "prune" == PrunePass.name
    assert len(saved["edits"][0]["result"]["scores"]["attn"]) == 4
    assert saved["ledger"][0]["metrics"]["scores"]["mlp"] == saved["edits"][0]["result"]["scores"]["mlp"]
    if "drop_blocks" in kw:  # whole blocks: plain Hugging Face, loads with transformers alone
        cfg = transformers.AutoConfig.from_pretrained(str(out))
        assert cfg.num_hidden_layers == 2
        plain = getattr(transformers, cfg.architectures[0]).from_pretrained(str(out)).eval()
        assert torch.equal(_outputs(plain, ckpt.family, batch), _outputs(new.model, ckpt.family, batch))


# --------------------------------------------------------------------------------------------
# (c) decoders: the KV cache after dropping attention
# --------------------------------------------------------------------------------------------


def _generate(model, **kw):
    ids = torch.randint(5, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    return model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generation_with_cache_equals_without(tiny_dirs, tmp_path, name):
    ckpt = ck.load(tiny_dirs[name])
    new = run_pass(PrunePass(attn_layers=[0, 2]), [ckpt], _ctx(ckpt), measure_fidelity=False)
    for model in (new.model, ck.load(ck.save(new, tmp_path / "out")).model):
        ref = _generate(model, use_cache=False)
        assert torch.equal(_generate(model, use_cache=True), ref)
        assert torch.equal(_generate(model, cache_implementation="static"), ref)
        out = model(torch.tensor([[5, 6, 7]]), use_cache=True)
        assert len(out.cache.layers) == 2 and out.cache.is_initialized  # one slot per kept layer, none empty


def test_cache_slots_keep_their_layer_type():
    """Qwen2 (llama family) mixing full and sliding-window layers: after dropping layer 0's
    attention, each kept layer must use a cache slot of its own type."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=384,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        use_sliding_window=True,
        sliding_window=6,
        layer_types=["full_attention", "full_attention", "sliding_attention", "sliding_attention"],
    )
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    fam = family_for("qwen2")
    PrunePass.apply_plan(model, Plan(num_layers=4, attention=[0]), fam)
    assert torch.equal(_generate(model, use_cache=True), _generate(model, use_cache=False))
    slots = model(torch.tensor([[5, 6, 7]]), use_cache=True).cache.layers
    assert [type(s).__name__ for s in slots] == [
        "DynamicLayer",
        "DynamicSlidingWindowLayer",
        "DynamicSlidingWindowLayer",
    ]


# --------------------------------------------------------------------------------------------
# Export of pruned models, every family
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{"attn_layers": [1, 3], "mlp_layers": [2]}, {"block_layers": [1]}])
def test_pruned_exports_validate(tiny, tmp_path, kw):
    from squeeze.compress.export import export_onnx

    _name, folder = tiny
    ckpt = ck.load(folder)
    new = run_pass(PrunePass(**kw), [ckpt], _ctx(ckpt), measure_fidelity=False)
    report = export_onnx(new, tmp_path / "m.onnx", latency=False)
    assert report["ok"]
    if "attn_layers" in kw:  # and through the CLI, from the saved folder
        out = ck.save(new, tmp_path / "pruned")
        assert main(["export", str(out), "-o", str(tmp_path / "cli.onnx")]) == 0


def test_export_with_every_attention_dropped(tiny_dirs, tmp_path):
    """With no attention left BERT never reads attention_mask: the graph loses that input and
    validation must feed only what the graph declares."""
    from squeeze.compress.export import export_onnx

    ckpt = ck.load(tiny_dirs["bert"])
    new = run_pass(PrunePass(drop_attn=1.0), [ckpt], _ctx(ckpt), measure_fidelity=False)
    report = export_onnx(new, tmp_path / "m.onnx", latency=False)
    assert report["ok"] and "attention_mask" not in report["inputs"]


# --------------------------------------------------------------------------------------------
# Errors, the CLI, the registry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"drop_attn": -0.5}, "must not be negative"),
        ({"drop_attn": 1.5}, "at most 1.0"),
        ({"drop_attn": True}, "a share in [0, 1]"),
        ({"drop_attn": 0.5, "drop_mlp": 1}, "exactly one of"),
        ({}, "exactly one of"),
        ({"attn_layers": [1, 1]}, "repeat"),
        ({"attn_layers": [-1]}, ">= 0"),
        ({"attn_layers": [1], "iterative": True}, "iterative"),
        ({"drop_attn": 1, "consecutive": True}, "consecutive"),
    ],
)
def test_bad_configs(kw, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PruneConfig(**kw)


@pytest.mark.parametrize(
    "name,kw,message",
    [
        ("bert", {"drop_attn": 5}, "cannot drop 5 attention sublayers: the model has only 4"),
        ("bert", {"drop_joint": 9}, "cannot drop 9 sublayers: the model has only 8"),
        ("vit", {"attn_layers": [4]}, "layer index 4 out of range"),
        ("bert", {"drop_blocks": 1.0}, "cannot drop all 4 blocks"),
        ("llama", {"drop_attn": 1.0}, "cannot drop all 4 attention layers of a decoder"),
        ("llama", {"keep_norm": True, "drop_attn": 1}, "post-LN encoders (bert) only; llama is a pre-norm decoder"),
        ("gpt2", {"keep_norm": False, "drop_mlp": 1}, "gpt2 is a pre-norm decoder"),
    ],
)
def test_bad_requests_for_the_model(tiny_dirs, name, kw, message):
    ckpt = ck.load(tiny_dirs[name])
    with pytest.raises(SqueezeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PrunePass(**kw).check(ckpt.family, [ckpt.model])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--drop-attn", "1.5"], "--drop-attn: a share must be at most 1.0"),
        (["--drop-attn", "-1"], "--drop-attn: must not be negative"),
        (["--drop-attn", "half"], "--drop-attn: expected a share"),
        (["--drop-attn", "9"], "cannot drop 9 attention sublayers"),
        (["--attn-layers", "1,x"], "--attn-layers: expected comma-separated"),
        (["--attn-layers", "7"], "layer index 7 out of range"),
        (["--drop-attn", "1", "--keep-norm"], "post-LN encoders (bert) only"),
        (["--drop-attn", "0.5", "--drop-mlp", "1"], "exactly one of"),
    ],
)
def test_cli_errors_exit_2_and_write_nothing(tiny_dirs, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_dirs["llama"]), *args, "-o", str(out)]) == 2
    assert message in capsys.readouterr().err.replace("\n", "")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_prune_dry_run_and_json(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", str(tiny_dirs["bert"]), "--samples", "8", "--seq-len", "16"]
    assert main([*args, "--drop-attn", "0.5", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "attention S" in text and "MLP S" in text and text.count("attention") >= 3
    assert not out.exists()
    assert main([*args, "--drop-blocks", "1", "-o", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["result"]["blocks"]) == 1 and data["report"]["params_after"] < data["report"]["params_before"]
    assert (out / "squeeze.json").exists()
    assert main([*args, "--drop-mlp", "1", "-o", str(out)]) == 2  # exists, no --force
    assert main([*args, "--drop-attn", "0.5"]) == 2  # no -o and no --dry-run


def test_the_name_prune_runs_this_pass(tiny_dirs):
    """``prune`` (the CLI subcommand, the recipe step, the API key) reaches this pass: explicit
    indices through the front door drop exactly those sublayers and record a ``prune`` edit."""
    new = apply(str(tiny_dirs["llama"]), {"prune": {"attn_layers": [1], "mlp_layers": [0]}}, measure_fidelity=False)
    fam = new.family
    layers = fam.layers(new.model)
    assert [i for i, layer in enumerate(layers) if fam.is_skipped(layer, "attn")] == [1]
    assert [i for i, layer in enumerate(layers) if fam.is_skipped(layer, "mlp")] == [0]
    edit = new.manifest.edits[-1]
    assert edit["pass"] == "prune" and (edit["result"]["attention"], edit["result"]["mlp"]) == ([1], [0])


def test_configs_replay_from_the_manifest():
    edit = Edit(pass_name="prune", config=PruneConfig(drop_attn=0.5).model_dump(mode="json"), result={})
    assert PruneConfig(**edit.config).drop_attn == 0.5  # configs replay from the manifest
    assert PruneConfig(drop_attn=1).drop_attn == 1 and isinstance(PruneConfig(drop_attn=1).drop_attn, int)
