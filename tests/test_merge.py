"""``squeeze merge``: logit averaging (Growing Transformers), its exact invariants and refusals."""

from __future__ import annotations

import copy
import json
import shutil

import onnx
import pytest
import torch
from pydantic import ValidationError
from tiny import build_tiny

from squeeze.cli.main import main
from squeeze.compress import load
from squeeze.compress.calibration import DataSpec
from squeeze.compress.errors import SqueezeError
from squeeze.compress.evaluate import model_outputs
from squeeze.compress.passes import PassContext, get_pass, run_pass
from squeeze.compress.passes.merge import HEADLESS_NOTE, MergeConfig, MergedModel

FAMILIES = ("bert", "vit", "llama", "gpt2")
# Three experts with weights (1, 2, 1)/4 against the same sum computed in float64: measured
# max abs error 6e-8 on logits of magnitude ~1 (float32 rounding of 1/4 * a + 1/2 * b + 1/4 * c).
WEIGHTED_ATOL = 1e-6
SHARPEN = 10.0  # weight scale that makes tiny decoders' greedy outputs vary (see _sharp)
EVAL = DataSpec(eval_samples=4, seq_len=16, batch_size=4)


def _expert(fam: str, tiny_dirs, folder, seed: int, **cfg_over):
    """A tiny checkpoint folder sharing the session tiny model's tokenizer (no retraining)."""
    build_tiny(fam, seed=seed, **cfg_over).save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        if (tiny_dirs[fam] / name).exists():
            shutil.copy(tiny_dirs[fam] / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def experts(tiny_dirs, tmp_path_factory):
    """Per family: folder A (the session tiny model) and B (another seed, same tokenizer)."""
    root = tmp_path_factory.mktemp("experts")
    return {f: (tiny_dirs[f], _expert(f, tiny_dirs, root / f"{f}_b", seed=1)) for f in FAMILIES}


def _merge(ckpts, weights=None, fidelity=False):
    merge = get_pass("merge")
    ctx = PassContext(family=ckpts[0].family, calibration=EVAL)
    return run_pass(merge(weights=weights), ckpts, ctx, measure_fidelity=fidelity)


def _batch(ckpt):
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=EVAL)
    return ctx.eval_batches()[0]


def _out(model, family, batch):
    ((name, value),) = model_outputs(model, family, batch).items()
    return name, value


@pytest.mark.parametrize("fam", FAMILIES)
def test_exact_mean_identity_and_zero_weight(fam, experts):
    a, b = load(experts[fam][0]), load(experts[fam][1])
    batch = _batch(a)
    name, la = _out(a.model, a.family, batch)
    _, lb = _out(b.model, b.family, batch)

    merged = _merge([a, b]).model
    kind, lm = _out(merged, a.family, batch)
    assert kind == name == ("logits" if fam in ("llama", "gpt2") else "last_hidden_state")
    assert torch.equal(lm, (la + lb) / 2)  # the exact mean, bit for bit
    assert not torch.equal(lm, la)

    assert torch.equal(_out(_merge([a, b], weights=[1, 0]).model, a.family, batch)[1], la)
    assert torch.equal(_out(_merge([a, load(experts[fam][0])]).model, a.family, batch)[1], la)
    # the same module object twice is copied, so the merge saves as two experts
    same = _merge([a, a]).model
    assert same.experts[0] is not same.experts[1]
    assert torch.equal(_out(same, a.family, batch)[1], la)


def test_weighted_mean_of_three(experts, tiny_dirs, tmp_path):
    a, b = load(experts["llama"][0]), load(experts["llama"][1])
    c = load(_expert("llama", tiny_dirs, tmp_path / "c", seed=2))
    batch = _batch(a)
    outs = [_out(m.model, a.family, batch)[1].double() for m in (a, b, c)]
    merged = _merge([a, b, c], weights=[1, 2, 1]).model
    want = 0.25 * outs[0] + 0.5 * outs[1] + 0.25 * outs[2]
    got = _out(merged, a.family, batch)[1].double()
    assert (got - want).abs().max() < WEIGHTED_ATOL
    assert merged.merge_weights == [0.25, 0.5, 0.25]


def test_cli_merge_save_reload_exact_inspect(experts, tiny_dirs, tmp_path, capsys):
    """Experts of different depth and width; the folder reloads to the same outputs bit for bit."""
    a = experts["llama"][0]
    b = _expert("llama", tiny_dirs, tmp_path / "wide", seed=3, num_hidden_layers=2, hidden_size=48)
    out = tmp_path / "merged"
    assert main(["merge", str(a), str(b), "-o", str(out), "--weights", "2,1", "--seq-len", "16"]) == 0
    manifest = json.loads((out / "squeeze.json").read_text())
    edit = manifest["edits"][-1]
    assert edit["pass"] == "merge" and edit["result"]["weights"] == pytest.approx([2 / 3, 1 / 3])
    assert edit["result"]["experts"][0]["config"]["hidden_size"] == 48
    row = manifest["ledger"][-1]
    assert row["params_after"] == sum(row["metrics"]["params_per_expert"]) > row["params_before"]
    assert (out / "tokenizer.json").exists()

    reloaded = load(out)
    ca, cb = load(a), load(b)
    batch = _batch(ca)
    want = (2 / 3) * _out(ca.model, ca.family, batch)[1] + (1 / 3) * _out(cb.model, cb.family, batch)[1]
    fresh = _out(_merge([ca, cb], weights=[2, 1]).model, ca.family, batch)[1]
    got = _out(reloaded.model, reloaded.family, batch)[1]
    assert isinstance(reloaded.model, MergedModel)
    assert torch.equal(got, fresh) and torch.equal(got, want)

    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "MergedModel" and info["params"] == row["params_after"]


def test_nested_merge_reloads(experts, tiny_dirs, tmp_path):
    """A merged folder as an expert: its own edits are replayed inside the outer merge."""
    ab = tmp_path / "ab"
    assert main(["merge", str(experts["gpt2"][0]), str(experts["gpt2"][1]), "-o", str(ab), "--seq-len", "16"]) == 0
    c = _expert("gpt2", tiny_dirs, tmp_path / "c", seed=2)
    out = tmp_path / "abc"
    assert main(["merge", str(c), str(ab), "-o", str(out), "--weights", "1,2", "--seq-len", "16"]) == 0
    ca, cab = load(c), load(ab)
    batch = _batch(ca)
    want = (1 / 3) * _out(ca.model, ca.family, batch)[1] + (2 / 3) * _out(cab.model, ca.family, batch)[1]
    assert torch.equal(_out(load(out).model, ca.family, batch)[1], want)


def test_headless_merge_says_it_averaged_hidden_states(experts):
    a, b = load(experts["bert"][0]), load(experts["bert"][1])
    row = _merge([a, b], fidelity=True).manifest.ledger[-1]
    assert row["metrics"]["averaged"] == "last_hidden_state"
    assert HEADLESS_NOTE in row["warnings"]
    assert 0 < row["fidelity"]["cos_mean"] < 1


def _sharp(fam: str, seed: int) -> torch.nn.Module:
    """A tiny decoder with weights scaled up so greedy decoding varies from token to token (at
    the default init, tiny GPT-2 repeats one token, which would hide position bugs)."""
    model = build_tiny(fam, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(SHARPEN)
    return model


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_generate_per_expert_cache(fam):
    a, b = _sharp(fam, 0), _sharp(fam, 1)
    ids = torch.randint(5, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row: positions must follow the mask (GPT-2's are absolute)
    ref = a.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert len(set(ref[:, 7:].flatten().tolist())) > 3  # the check below is not vacuous
    twins = MergedModel([a, copy.deepcopy(a)], [1, 1])
    assert torch.equal(twins.generate(ids, attention_mask=mask, max_new_tokens=10), ref)

    merged = MergedModel([a, b], [1, 1])
    seen: list[tuple[int, int]] = []  # (expert, tokens fed) per forward call
    for i, expert in enumerate(merged.experts):
        expert.register_forward_pre_hook(
            lambda m, args, kw, i=i: seen.append((i, kw["input_ids"].shape[1])), with_kwargs=True
        )
    cached = merged.generate(ids, attention_mask=mask, max_new_tokens=10, use_cache=True)
    assert sorted(seen) == sorted(
        [(i, 7) for i in (0, 1)] + [(i, 1) for i in (0, 1)] * 9
    )  # each expert's cache is used
    uncached = merged.generate(ids, attention_mask=mask, max_new_tokens=10, use_cache=False)
    assert torch.equal(cached, uncached)
    out = merged(input_ids=ids, attention_mask=mask, use_cache=True)
    assert len(out.cache) == 2 and out.cache[0] is not out.cache[1]  # one cache per expert


def test_export_one_graph_with_all_experts(experts, tmp_path):
    from squeeze.compress.export import export_onnx

    merged = _merge([load(experts["llama"][0]), load(experts["llama"][1])])
    path = tmp_path / "merged.onnx"
    report = export_onnx(merged, path, latency=False)
    assert report["ok"] and report["outputs"] == ["logits"]
    names = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert any("experts.0." in n for n in names) and any("experts.1." in n for n in names)


def _edit_tokenizer(folder, fn):
    tok = json.loads((folder / "tokenizer.json").read_text())
    fn(tok)
    (folder / "tokenizer.json").write_text(json.dumps(tok))


def _swap_two_tokens(tok):
    vocab = tok["model"]["vocab"]
    x, y = list(vocab)[100:102]
    vocab[x], vocab[y] = vocab[y], vocab[x]


def _refusal_cases(experts, tiny_dirs, root):
    """(argv models, extra args, words the error must contain)."""
    llama_a = experts["llama"][0]
    swapped = shutil.copytree(experts["llama"][1], root / "swapped")
    _edit_tokenizer(swapped, _swap_two_tokens)
    special = shutil.copytree(experts["llama"][1], root / "special")
    cfg = json.loads((special / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<unk>"
    (special / "tokenizer_config.json").write_text(json.dumps(cfg))
    no_tok = shutil.copytree(experts["llama"][1], root / "no_tok")
    (no_tok / "tokenizer.json").unlink()
    big_vocab = _expert("llama", tiny_dirs, root / "vocab", seed=1, vocab_size=400)
    vit_cls = dict(architectures=["ViTForImageClassification"])
    vit10 = _expert("vit", tiny_dirs, root / "vit10", seed=0, num_labels=10, **vit_cls)
    vit5 = _expert("vit", tiny_dirs, root / "vit5", seed=1, num_labels=5, **vit_cls)
    vit10b = _expert("vit", tiny_dirs, root / "vit10b", seed=1, num_labels=10, **vit_cls)
    vit10c = _expert("vit", tiny_dirs, root / "vit10c", seed=2, num_labels=10, **vit_cls)
    named = _expert("vit", tiny_dirs, root / "named", seed=3, id2label={i: f"digit {i}" for i in range(10)}, **vit_cls)
    for folder, mean in ((vit10b, 0.5), (vit10, 0.4)):
        (folder / "preprocessor_config.json").write_text(
            json.dumps({"image_mean": [mean] * 3, "size": {"height": 16, "width": 16}})
        )
    cls = _expert("bert", tiny_dirs, root / "bert_cls", seed=1, architectures=["BertForSequenceClassification"])
    return {
        "family": ([experts["bert"][0], experts["gpt2"][0]], [], ["bert", "gpt2"]),
        "head_vs_headless": ([experts["bert"][0], cls], [], ["logits", "hidden states"]),
        "vocab_size": ([llama_a, big_vocab], [], ["vocab_size", "384", "400"]),
        "vocabulary": ([llama_a, swapped], [], ["tokenizers", "vocabulary"]),
        "special_tokens": ([llama_a, special], [], ["tokenizers", "special tokens"]),
        "no_tokenizer": ([llama_a, no_tok], [], ["no tokenizer"]),
        "num_labels": ([vit10, vit5], [], ["num_labels", "10", "5"]),
        "image_processor": ([vit10, vit10b], [], ["image processors", "image_mean"]),
        "label_names": ([vit10c, named], [], ["label names (id2label)"]),
        "vit_head_vs_headless": ([vit10c, experts["vit"][0]], [], ["logits", "hidden states"]),
        "one_model": ([llama_a], [], ["at least two"]),
        "weights_count": ([llama_a, experts["llama"][1]], ["--weights", "1,1,1"], ["3 values for 2 models"]),
        "weights_negative": ([llama_a, experts["llama"][1]], ["--weights", "1,-1"], ["non-negative"]),
        "weights_zero": ([llama_a, experts["llama"][1]], ["--weights", "0,0"], ["all be zero"]),
        "weights_text": ([llama_a, experts["llama"][1]], ["--weights", "a,b"], ["comma-separated numbers"]),
    }


def test_refusals_name_the_mismatch_and_write_nothing(experts, tiny_dirs, tmp_path, capsys):
    cases = _refusal_cases(experts, tiny_dirs, tmp_path)
    for case, (models, extra, words) in cases.items():
        out = tmp_path / f"out_{case}"
        capsys.readouterr()
        code = main(["merge", *map(str, models), "-o", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 2, (case, err)
        assert all(w in err for w in words), (case, err)
        assert not out.exists(), case
    assert not list(tmp_path.glob(".out_*"))  # no temporary folders left behind either


def test_config_recipe_form_and_validation():
    cfg = MergeConfig.model_validate({"with": ["b", "c"], "weights": [0.5, 0.25, 0.25]})
    assert cfg.others == ["b", "c"]  # the recipe's old key "with" reads as MultiModelConfig.others
    assert MergeConfig(**cfg.model_dump(mode="json")) == cfg  # what checkpoint.load replays
    assert MergeConfig.model_validate({"with": ["b"]}).weights is None
    for bad in (
        {"with": ["b"], "weights": [1, 1, 1]},
        {"weights": [1, -1]},
        {"weights": [0, 0]},
        {"weights": [1]},
        {"with": ["b"], "wieghts": [1, 1]},
    ):
        with pytest.raises(ValidationError):
            MergeConfig.model_validate(bad)


def test_apply_on_bare_modules_rebuilds_from_config(experts):
    """Without checkpoints (a library call on modules) the merge still records what reload needs."""
    merge = get_pass("merge")(weights=[1, 3])
    a, b = build_tiny("llama", seed=0), build_tiny("llama", seed=1)
    ctx = PassContext(family=load(experts["llama"][0]).family)
    merged = merge.apply([a, b], ctx)
    assert any("tokenizers were not compared" in w for w in ctx.warnings)
    from squeeze.compress.passes import Edit

    edit = Edit(pass_name="merge", config=merge.config.model_dump(mode="json"), result=ctx.result)
    rebuilt = merge.restructure(build_tiny("llama", seed=5), edit, ctx.family)
    rebuilt.load_state_dict(merged.state_dict())
    ids = torch.arange(1, 9)[None]
    assert torch.equal(rebuilt(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_recipe_step(experts, tmp_path, capsys):
    """``- merge: {with: [B], weights: [...]}`` in a recipe: the engine loads B and merges."""
    a, b = experts["llama"]
    recipe = tmp_path / "merge.yaml"
    body = """version: 1
defaults:
  calibration: {{source: builtin, samples: 4, seq_len: 16, eval_samples: 4}}
jobs:
  - name: m
    model: {a}
    steps:
      - merge: {{with: [{b}], weights: {w}}}
"""
    recipe.write_text(body.format(a=a, b=b, w="[3, 1]"))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 0
    ca, cb = load(a), load(b)
    batch = _batch(ca)
    want = 0.75 * _out(ca.model, ca.family, batch)[1] + 0.25 * _out(cb.model, cb.family, batch)[1]
    assert torch.equal(_out(load(tmp_path / "out" / "m" / "01-merge").model, ca.family, batch)[1], want)

    recipe.write_text(body.format(a=a, b=b, w="[1, 1, 1]"))
    capsys.readouterr()
    assert main(["run", str(recipe), "-o", str(tmp_path / "bad")]) == 2
    assert "3 weights for 2 experts" in capsys.readouterr().err


def test_single_model_pass_on_merged_model_is_refused(experts):
    """prune after merge would change only expert 0: refused with advice, not done silently."""
    a, b = (load(p) for p in experts["bert"])
    merged = _merge([a, b])
    prune = get_pass("prune")
    with pytest.raises(SqueezeError, match="compress the experts first"):
        run_pass(prune(drop_attn=1), [merged], PassContext(family=merged.family, calibration=EVAL))


def test_merging_a_model_with_itself_is_said_and_other_models_are_not(experts):
    a, b = load(experts["vit"][0]), load(experts["vit"][1])
    same = _merge([a, load(experts["vit"][0])]).manifest.ledger[-1]["warnings"]
    assert any("models 1 and 2 have identical weights" in w for w in same)
    other = _merge([a, b]).manifest.ledger[-1]["warnings"]
    assert not any("identical weights" in w for w in other)
