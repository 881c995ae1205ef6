"""``merge``: behaviour the mutation run of passes/merge found untested (issue 17).

A headless merge averages the pooler output too, reloads headless, reports its progress and
whether the experts share an embedding (every expert compared). Refusals name the experts ("model 1", "model 2" when no names are given) and say what differs:
the first differing tokenizer entry and how many differ, or the first differing sample text.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from tiny import build_tiny

from squeeze.compress import checkpoint as ck
from squeeze.compress import load
from squeeze.compress.calibration import DataSpec
from squeeze.compress.errors import SqueezeError
from squeeze.compress.passes import PassContext, run_pass
from squeeze.compress.passes.merge import MergePass
from squeeze.compress.passes.merge.compat import _diff_hint, check_models, embeddings_identical


def test_refusal_names_unnamed_models_from_one():
    with pytest.raises(SqueezeError) as err:
        check_models([build_tiny("llama"), build_tiny("gpt2")])
    assert str(err.value) == "cannot merge: model 1 is a llama model, model 2 is a gpt2 model"


def test_diff_hint_says_what_differs():
    a = {"<pad>": 0, "hello": 5, "world": 6}
    b = {"<pad>": 0, "hello": 7, "world": 8}
    assert _diff_hint(a, b) == " (e.g. 'hello': 5 vs 7; 2 entries differ)"
    assert _diff_hint({"x": 1}, {"y": 1}) == " (e.g. 'x': 1 vs None; 2 entries differ)"
    assert _diff_hint(a, dict(a)) == ""
    assert _diff_hint(a, ["hello"]) == ""  # a dict against a list: no hint, no error
    samples_a, samples_b = ["[CLS] the cat sat", "x"], ["[CLS] a cat sat", "x"]
    assert _diff_hint(samples_a, samples_b) == " (first sample: [CLS] th... vs [CLS] a ...)"
    assert _diff_hint(samples_a, list(samples_a)) == ""
    assert _diff_hint([], samples_b) == ""


EVAL = DataSpec(eval_samples=4, seq_len=16, batch_size=4)


def _second_bert(tiny_dirs, folder: Path) -> Path:
    """Another tiny BERT (seed 1) with the session tiny BERT's tokenizer."""
    build_tiny("bert", seed=1).save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_dirs["bert"] / name).exists():
            shutil.copy(tiny_dirs["bert"] / name, folder / name)
    return folder


def test_headless_merge_averages_pooler_reloads_headless_and_reports(tiny_dirs, tmp_path):
    a, b = ck.load(tiny_dirs["bert"]), ck.load(_second_bert(tiny_dirs, tmp_path / "b"))
    seen: list[tuple[str, int, int]] = []
    ctx = PassContext(family=a.family, calibration=EVAL, progress=lambda *x: seen.append(x))
    new = run_pass(MergePass(), [a, b], ctx, measure_fidelity=False)
    assert [t for t in seen if t[0] == "merge"] == [("merge", 0, 1), ("merge", 1, 1)]
    assert new.manifest.ledger[-1]["metrics"]["embeddings_identical"] is False
    batch = PassContext(family=a.family, checkpoint=a, calibration=EVAL).eval_batches()[0]
    kw = {k: v for k, v in batch.items() if k in a.family.model_inputs}
    with torch.no_grad():
        oa, ob, om = a.model(**kw), b.model(**kw), new.model(**kw)
    for name in ("last_hidden_state", "pooler_output"):
        assert torch.allclose(getattr(om, name), 0.5 * getattr(oa, name) + 0.5 * getattr(ob, name), atol=1e-6)
    back = load(ck.save(new, tmp_path / "merged"))
    assert back.model.output == "last_hidden_state"
    with torch.no_grad():
        assert torch.equal(back.model(**kw).last_hidden_state, om.last_hidden_state)


def test_embeddings_identical_compares_every_expert(tiny_dirs):
    a = build_tiny("llama")
    fam = ck.load(tiny_dirs["llama"]).family
    assert embeddings_identical([a, copy.deepcopy(a)], fam)
    assert not embeddings_identical([a, build_tiny("llama", seed=1)], fam)
    assert not embeddings_identical([a, copy.deepcopy(a), build_tiny("llama", seed=1)], fam)


def test_refusal_names_the_differing_config_value_and_both_experts():
    with pytest.raises(SqueezeError) as err:
        check_models([build_tiny("bert"), build_tiny("bert", hidden=48)], names=["a/bert", "b/bert"])
    assert str(err.value) == "cannot merge: hidden_size differs: a/bert has 32, b/bert has 48"


def test_side_file_warnings_reach_the_run(tmp_path):
    """Checked once before any work (check_data); what it could not compare is a warning of the run."""
    for seed in (0, 1):
        build_tiny("llama", seed=seed).save_pretrained(str(tmp_path / f"m{seed}"))  # no tokenizer files
    a, b = ck.load(tmp_path / "m0"), ck.load(tmp_path / "m1")
    ctx = PassContext(family=a.family, calibration=EVAL)
    run_pass(MergePass(), [a, b], ctx, measure_fidelity=False)
    assert "no expert has a tokenizer: only the vocabulary sizes were compared" in ctx.warnings
