"""``prune``: behaviour the mutation run of passes/prune found untested (issue 17).

Iterative single-type dropping picks the highest score (not the first layer), reports every round
to progress and to the log; the manifest's scores are the measured ones (six decimals, None for a
sublayer an earlier step dropped); the metrics and summary say what was dropped; a bad manifest is
refused naming its field; ``top_k`` never returns a -inf (already dropped) candidate.
"""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch

import squeeze.compress as ck  # load = run.load (replays squeeze folders), save = checkpoint.save
from squeeze.compress.calibration import DataSpec
from squeeze.compress.errors import SqueezeError
from squeeze.compress.passes import PassContext, run_pass
from squeeze.compress.passes.prune import PrunePass, PruneResult, layer_scores, to_indices, top_k

SPEC = DataSpec(samples=8, seq_len=16, batch_size=4, eval_samples=4)
S_ONE_TOL = 1e-6  # a zero output projection: cos(h, h) in fp32, measured within 6e-8 of 1 (test_prune.py)
ROUND_TOL = 5e-7  # the manifest rounds scores to 6 decimals: at most half a unit of the 6th


def _zero(ckpt, layer: int, role: str) -> None:
    fam = ckpt.family
    with torch.no_grad():
        mod = fam.role(fam.layers(ckpt.model)[layer], role)
        mod.weight.zero_()
        if mod.bias is not None:
            mod.bias.zero_()


@pytest.mark.parametrize("which,layer", [("attn", 2), ("mlp", 3)])
def test_iterative_single_type_drops_the_highest_score(tiny_dirs, which, layer, caplog):
    """A zeroed output projection in a later layer scores 1 and goes first, round by round."""
    ckpt = ck.load(tiny_dirs["llama"])
    _zero(ckpt, layer, f"{which}_out")
    seen: list[tuple[str, int, int]] = []
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC, progress=lambda *a: seen.append(a))
    with caplog.at_level(logging.INFO, logger="squeeze.compress.passes.prune.prune"):
        plan = PrunePass(**{f"drop_{which}": 2, "iterative": True}).plan(ckpt.model, ctx)
    first, second = plan.rounds
    assert (first["kind"], first["layer"]) == (which, layer)
    assert abs(first["S"] - 1.0) < S_ONE_TOL
    assert second["layer"] != layer and second["kind"] == which
    assert getattr(plan, "attention" if which == "attn" else "mlp") == sorted([layer, second["layer"]])
    # round 2 re-scores the partly pruned model and says so to the progress callback
    assert ("re-scoring (round 2/2)", 4, 4) in seen
    assert not any(label.startswith("re-scoring (round 1") for label, _, _ in seen)
    # and each round is logged with what it dropped and its score
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round ")]
    assert logged == [
        f"round {i + 1}: drop {r['kind']} {r['layer']} (S={r['S']:.6f})" for i, r in enumerate(plan.rounds)
    ]


def test_manifest_scores_are_the_measured_scores(tiny_dirs):
    """The result's scores equal layer_scores to 6 decimals; a sublayer dropped by an earlier step is None."""
    ckpt = ck.load(tiny_dirs["gpt2"])
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)
    first = run_pass(PrunePass(attn_layers=[1]), [ckpt], ctx, measure_fidelity=False)
    ctx2 = PassContext(family=first.family, checkpoint=first, calibration=SPEC)
    measured = layer_scores(first.model, first.family, ctx2.calib_batches())
    second = run_pass(PrunePass(drop_mlp=1), [first], ctx2, measure_fidelity=False)
    scores = second.manifest.edits[-1]["result"]["scores"]
    assert scores["attn"][1] is None and measured["attn"][1] == -math.inf
    for key in ("attn", "mlp", "block"):
        for i, (got, want) in enumerate(zip(scores[key], measured[key], strict=True)):
            if want == -math.inf:
                continue
            assert isinstance(got, float) and abs(got - want) <= ROUND_TOL, (key, i, got, want)
            assert got == round(got, 6)
    assert 0.5 < max(s for s in scores["mlp"] if s is not None) < 1.0  # not rounded to an integer


def test_metrics_and_summary_say_what_was_dropped(tiny_dirs):
    ckpt = ck.load(tiny_dirs["bert"])
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)
    PrunePass(attn_layers=[0, 3], mlp_layers=[2]).apply([copy.deepcopy(ckpt.model)], ctx)
    assert ctx.metrics["dropped"] == {"attention": [0, 3], "mlp": [2], "blocks": []}
    assert ctx.result.summary() == ["dropped attention 0, 3; MLP 2 of 4 layers"]
    assert PruneResult(num_layers=6, blocks=[4]).summary() == ["dropped blocks 4 of 6 layers"]
    assert PruneResult(num_layers=4).summary() == ["dropped nothing of 4 layers"]
    assert ctx.metrics["keep_norm"] is True and "rounds" not in ctx.metrics  # bert: post-LN keeps its norm
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)
    PrunePass(drop_mlp=2, iterative=True).apply([copy.deepcopy(ckpt.model)], ctx)
    assert ctx.metrics["rounds"] == ctx.result.rounds and len(ctx.result.rounds) == 2
    assert ctx.metrics["dropped"]["mlp"] == sorted(r["layer"] for r in ctx.result.rounds)
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)
    PrunePass(drop_attn=0.1).apply([copy.deepcopy(ckpt.model)], ctx)  # 0.1 x 4 rounds to 0
    assert ctx.warnings == ["nothing dropped: the amount rounds to 0 layers"]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("attention", [9], "attention: layer index 9 out of range"),
        ("mlp", [7], "mlp: layer index 7 out of range"),
        ("blocks", [True, False], "blocks: a boolean mask needs 4 entries"),
        ("num_layers", 5, "prune edit was made on 5 layers, the model has 4"),
    ],
)
def test_bad_manifest_is_refused_naming_its_field(tiny_dirs, tmp_path, field, value, message):
    ckpt = ck.load(tiny_dirs["gpt2"])
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)
    out = ck.save(run_pass(PrunePass(attn_layers=[0]), [ckpt], ctx, measure_fidelity=False), tmp_path / "p")
    manifest = json.loads((out / "squeeze.json").read_text())
    manifest["edits"][0]["result"][field] = value
    (out / "squeeze.json").write_text(json.dumps(manifest))
    with pytest.raises(SqueezeError, match=message):
        ck.load(out)


def test_a_manifest_without_num_layers_still_loads(tiny_dirs, tmp_path):
    ckpt = ck.load(tiny_dirs["gpt2"])
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)
    new = run_pass(PrunePass(attn_layers=[0]), [ckpt], ctx, measure_fidelity=False)
    out = ck.save(new, tmp_path / "p")
    manifest = json.loads((out / "squeeze.json").read_text())
    del manifest["edits"][0]["result"]["num_layers"]
    (out / "squeeze.json").write_text(json.dumps(manifest))
    assert ckpt.family.is_skipped(ckpt.family.layers(ck.load(out).model)[0], "attn")


def test_top_k_never_returns_a_dropped_candidate():
    inf = -math.inf
    assert top_k([0.5, inf, 0.2, 0.9], 4) == [0, 2, 3]
    assert top_k([0.5, inf, 0.2, 0.9], 2, exclude={3}) == [0, 2]
    assert top_k([inf, inf], 1) == []


def test_to_indices_refuses_mixed_and_non_integer_entries():
    for bad in ([1, True], [0, 1.0], ["2"]):
        with pytest.raises(SqueezeError, match="attention: expected layer indices or a boolean mask"):
            to_indices(bad, 4, "attention")
    assert to_indices([3, 1, 3], 4, "attention") == [1, 3]
    assert to_indices(None, 4, "attention") == []


def test_one_shot_mlp_drop_takes_the_zeroed_layer(tiny_dirs):
    ckpt = ck.load(tiny_dirs["llama"])
    _zero(ckpt, 1, "mlp_out")
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)
    plan = PrunePass(drop_mlp=1).plan(ckpt.model, ctx)
    assert plan.mlp == [1] and plan.attention == [] and plan.blocks == []
    assert abs(plan.scores["mlp"][1] - 1.0) < S_ONE_TOL


def test_scored_bert_drop_keeps_the_norm_like_an_explicit_one(tiny_dirs):
    """A scored drop on post-LN BERT uses the default keep_norm, exactly as the explicit drop of that layer."""
    ckpt = ck.load(tiny_dirs["bert"])
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)
    scored = run_pass(PrunePass(drop_attn=1), [ckpt], ctx, measure_fidelity=False)
    res = scored.manifest.edits[-1]["result"]
    assert res["keep_norm"] is True and res["num_layers"] == 4
    explicit = run_pass(PrunePass(attn_layers=res["attention"]), [ckpt], ctx, measure_fidelity=False)
    assert explicit.manifest.edits[-1]["result"]["num_layers"] == 4
    batch = ctx.eval_batches()[0]
    with torch.no_grad():
        a = scored.model(**{k: v for k, v in batch.items() if k in ckpt.family.model_inputs}).last_hidden_state
        b = explicit.model(**{k: v for k, v in batch.items() if k in ckpt.family.model_inputs}).last_hidden_state
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "name,kw,message",
    [
        (
            "llama",
            {"keep_norm": False, "drop_attn": 1},
            "keep_norm is an option of post-LN encoders (bert) only; llama is a pre-norm decoder, "
            "where a dropped sublayer always takes its norm with it",
        ),
        (
            "llama",
            {"attn_layers": [0, 1, 2, 3]},
            "cannot drop all 4 attention layers of a decoder: nothing would mix tokens, "
            "and the KV cache would have no slot",
        ),
        ("vit", {"attn_layers": [4]}, "attn_layers: layer index 4 out of range (the model has 4 layers: 0..3)"),
    ],
)
def test_refusals_say_why_in_full(tiny_dirs, name, kw, message):
    ckpt = ck.load(tiny_dirs[name])
    with pytest.raises(SqueezeError) as err:
        PrunePass(**kw).check(ckpt.family, [ckpt.model])
    assert str(err.value) == message


def test_explicit_block_layers_remove_those_blocks(tiny_dirs):
    ckpt = ck.load(tiny_dirs["vit"])
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)
    new = run_pass(PrunePass(block_layers=[1, 2]), [ckpt], ctx, measure_fidelity=False)
    assert new.family.num_layers(new.model) == 2
    assert new.manifest.edits[-1]["result"]["blocks"] == [1, 2]


def test_counts_left_after_an_earlier_step(tiny_dirs):
    """Sublayers an earlier step dropped are not candidates: asking for more than remain is refused."""
    ckpt = ck.load(tiny_dirs["bert"])
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)
    first = run_pass(PrunePass(attn_layers=[0, 1]), [ckpt], ctx, measure_fidelity=False)
    with pytest.raises(SqueezeError) as err:
        PrunePass(drop_attn=3).check(first.family, [first.model])
    assert str(err.value) == "cannot drop 3 attention sublayers: only 2 remain (an earlier step dropped the others)"
    PrunePass(drop_attn=2).check(first.family, [first.model])  # exactly what remains is fine
    with pytest.raises(SqueezeError) as err:
        PrunePass(drop_mlp=5).check(first.family, [first.model])
    assert str(err.value) == "cannot drop 5 MLP sublayers: the model has only 4"
    with pytest.raises(SqueezeError) as err:
        PrunePass(mlp_layers=[5]).check(first.family, [first.model])
    assert str(err.value) == "mlp_layers: layer index 5 out of range (the model has 4 layers: 0..3)"
