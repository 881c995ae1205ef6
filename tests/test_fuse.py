"""``squeeze fuse``: optimal-transport fusion (Imfeld et al., ICLR 2024), its exact invariants and refusals."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from tiny import build_tiny

from squeeze.cli.main import main
from squeeze.compress import load
from squeeze.compress.calibration import DataSpec
from squeeze.compress.errors import SqueezeError
from squeeze.compress.families import family_for, permute_spaces, random_symmetry, weight_spaces
from squeeze.compress.passes import Edit, PassContext, get_pass
from squeeze.compress.passes.base import result_dump
from squeeze.compress.passes.fuse.transport import columns, solve

FAMILIES = ("bert", "vit", "llama", "gpt2")
# A permuted copy's outputs against the original: measured max abs error 7e-7 (float32 sums in
# another order); EMD on activations recovers the permutation exactly (measured error 0.0).
PERM_ATOL = 1e-5
EXACT_ATOL = 1e-6
ROWSUM_ATOL = 1e-9  # a scaled plan's row sums: measured 2e-16 (EMD) and 1e-10 (Sinkhorn, stop 1e-9)
SINKHORN_CLOSE = (
    1e-5  # Sinkhorn at reg 0.01 on a permuted copy vs EMD, max weight difference: measured 0.0 (1.5e-6 at 0.03)
)
DATA = DataSpec(samples=4, seq_len=16, batch_size=4, eval_samples=4)
# Nothing in the pooler's *output* space permutes: its bias is the one tensor no space lists.
UNALIGNED = {"bert": {"pooler.dense.bias"}, "vit": {"pooler.dense.bias"}, "llama": set(), "gpt2": set()}


def _batches(fam: str, n: int = 8):
    g = torch.Generator().manual_seed(1)
    if fam == "vit":
        return [{"pixel_values": torch.randn(n, 3, 16, 16, generator=g)}]
    ids = torch.randint(0, 384, (n, 16), generator=g)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def _permuted(model, seed: int = 0):
    """A function-preserving permutation of ``model`` (residual, Q/K heads, V/O, MLP) and the perm."""
    fam = family_for(model.config.model_type)
    spaces = weight_spaces(fam, model)
    perm = random_symmetry(spaces, torch.Generator().manual_seed(seed))
    out = copy.deepcopy(model)
    out.load_state_dict(permute_spaces(model.state_dict(), spaces, perm))
    return out, perm


def _fuse(models, fam: str, **cfg):
    pass_ = get_pass("fuse")(**cfg)
    family = family_for(models[0].config.model_type)
    pass_.check(family, models)
    ctx = PassContext(family=family)
    ctx._calib = _batches(fam)
    return pass_.apply(models, ctx), ctx


def _out(model, fam: str):
    with torch.no_grad():
        o = model(**_batches(fam, 3)[0])
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _max_diff(m1, m2) -> float:
    s1, s2 = m1.state_dict(), m2.state_dict()
    return max(float((s1[k].double() - s2[k].double()).abs().max()) for k in s1 if s1[k].is_floating_point())


@pytest.mark.parametrize("fam", FAMILIES)
def test_weight_spaces_cover_the_model_and_their_symmetry_preserves_function(fam):
    a = build_tiny(fam, layers=2)
    covered = {ax.param for s in weight_spaces(family_for(a.config.model_type), a) for ax in s.axes}
    assert {k for k, _ in a.named_parameters()} - covered == UNALIGNED[fam]
    b, perm = _permuted(a)
    assert _max_diff(a, b) > 0.01  # really permuted
    out_a, out_b = _out(a, fam), _out(b, fam)
    if fam in ("bert", "vit"):  # headless: the hidden state comes out in the permuted residual order
        out_a = out_a[..., perm["residual"]["all"]]
    torch.testing.assert_close(out_b, out_a, atol=PERM_ATOL, rtol=0)


@pytest.mark.parametrize("cost", ["acts", "weights"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_exact_recovery_of_a_permuted_copy(fam, cost):
    """Fusing A into anchor B = perm(A) with EMD returns B, so the logits equal A's."""
    a = build_tiny(fam, layers=2)
    b, _ = _permuted(a)
    fused, ctx = _fuse([a, b], fam, solver="emd", cost=cost)
    assert _max_diff(fused, b) <= EXACT_ATOL
    assert result_dump(ctx.result)["plan_sharpness"] == 1.0
    if fam in ("llama", "gpt2"):
        torch.testing.assert_close(_out(fused, fam), _out(a, fam), atol=PERM_ATOL, rtol=0)


@pytest.mark.parametrize("fam", ["vit", "llama"])
def test_self_fusion_is_the_identity_and_vanilla_is_the_plain_mean(fam):
    a, c = build_tiny(fam, layers=2), build_tiny(fam, layers=2, seed=7)
    for solver in ("emd", "none"):
        assert _max_diff(_fuse([a, copy.deepcopy(a)], fam, solver=solver)[0], a) <= EXACT_ATOL
    fused, _ = _fuse([a, c], fam, solver="none", weights=[3, 1])
    sa, sc = a.state_dict(), c.state_dict()
    for k, v in fused.state_dict().items():
        torch.testing.assert_close(v, 0.75 * sa[k] + 0.25 * sc[k], atol=1e-6, rtol=0)


def test_every_scaled_plan_sums_to_one_per_row():
    g = torch.Generator().manual_seed(0)
    for n0, n1 in ((7, 7), (9, 5), (4, 6)):
        cost = torch.rand(n0, n1, generator=g, dtype=torch.float64)
        for solver in ("emd", "sinkhorn"):
            plan = solve(cost / cost.max(), solver, 0.08)
            torch.testing.assert_close(plan.sum(1), torch.ones(n0, dtype=torch.float64), atol=ROWSUM_ATOL, rtol=0)
            torch.testing.assert_close(
                columns(plan).sum(0), torch.ones(n1, dtype=torch.float64), atol=ROWSUM_ATOL, rtol=0
            )
    # every plan of a real fusion, GQA's expanded W_O plan and the residual means included
    from squeeze.compress.passes.fuse.acts import capture
    from squeeze.compress.passes.fuse.align import Aligner, AlignSettings

    a, c = build_tiny("llama", layers=2), build_tiny("llama", layers=2, seed=3)
    fam = family_for("llama")
    sp = [weight_spaces(fam, m) for m in (a, c)]
    acts = [capture(m, fam, s, _batches("llama"), 4096) for m, s in zip((a, c), sp, strict=True)]
    al = Aligner(sp[0], sp[1], a.state_dict(), c.state_dict(), acts[0], acts[1], AlignSettings())
    al.solve_all(2)
    assert ("layers.1.vo", "o") in al.plans and ("residual", "4") in al.plans
    for plan in al.plans.values():
        torch.testing.assert_close(plan.sum(1), torch.ones(len(plan), dtype=torch.float64), atol=1e-6, rtol=0)


def test_residual_policies_combine_stream_and_branch_plans():
    """After layer 0's attention the stream plan is policy(stage-0 plan, branch plan): ``mean`` is
    the midpoint of ``only_resid`` and ``no_resid``, ``weighted`` a convex mix of the two."""
    from squeeze.compress.passes.fuse.acts import capture
    from squeeze.compress.passes.fuse.align import Aligner, AlignSettings

    a, c = build_tiny("vit", layers=2), build_tiny("vit", layers=2, seed=3)
    fam = family_for("vit")
    sp = [weight_spaces(fam, m) for m in (a, c)]
    acts = [capture(m, fam, s, _batches("vit"), 4096) for m, s in zip((a, c), sp, strict=True)]
    stage1 = {}
    for policy in ("mean", "weighted", "only_resid", "no_resid"):
        al = Aligner(sp[0], sp[1], a.state_dict(), c.state_dict(), acts[0], acts[1], AlignSettings(residual=policy))
        al.solve_all(2)
        stage1[policy] = al.plans[("residual", "1")]
    resid, branch = stage1["only_resid"], stage1["no_resid"]
    assert not torch.allclose(resid, branch)
    torch.testing.assert_close(stage1["mean"], (resid + branch) / 2, atol=1e-12, rtol=0)
    w = stage1["weighted"]
    lam = float(((w - branch) * (resid - branch)).sum() / ((resid - branch) ** 2).sum())
    assert 0 < lam < 1 and abs(lam - 0.5) > 1e-3
    torch.testing.assert_close(w, lam * resid + (1 - lam) * branch, atol=1e-9, rtol=0)


def test_sinkhorn_approaches_emd_as_reg_shrinks():
    from squeeze.compress.passes.fuse.transport import ground_cost

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 50, generator=g)
    y = x[torch.randperm(16, generator=g)] + 0.3 * torch.randn(16, 50, generator=g)  # a clear optimum
    cost = ground_cost(x, y)
    emd = solve(cost, "emd", 0.0)
    plan_gaps = [float((solve(cost, "sinkhorn", reg) - emd).abs().max()) for reg in (0.1, 0.03, 0.01)]
    assert plan_gaps[0] > plan_gaps[1] > plan_gaps[2] and plan_gaps[2] <= ROWSUM_ATOL  # measured 2e-16
    a = build_tiny("gpt2", layers=2)
    b, _ = _permuted(a)
    gaps = [_max_diff(_fuse([a, b], "gpt2", solver="sinkhorn", reg=reg)[0], b) for reg in (0.08, 0.03, 0.01)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] <= SINKHORN_CLOSE


def test_three_models_and_given_weights():
    a = build_tiny("vit", layers=2)
    b, _ = _permuted(a, seed=1)
    c, _ = _permuted(a, seed=2)
    assert _max_diff(_fuse([a, b, c], "vit", solver="emd")[0], c) <= EXACT_ATOL  # all align onto the anchor
    other = build_tiny("vit", layers=2, seed=9)
    fused, ctx = _fuse([other, a, b], "vit", solver="sinkhorn", weights=[0, 0, 2])
    assert result_dump(ctx.result)["weights"] == [0.0, 0.0, 1.0]
    assert _max_diff(fused, b) == 0.0


def _widened(model, fam: str):
    """``model`` with every MLP neuron duplicated (fc1 rows twice, fc2 columns halved): same function."""
    import transformers as T

    family = family_for(model.config.model_type)
    cfg = copy.deepcopy(model.config)
    cfg.intermediate_size = 2 * cfg.intermediate_size
    wide = getattr(T, type(model).__name__)._from_config(cfg).eval()
    state = dict(model.state_dict())
    for s in weight_spaces(family, model):
        if s.kind == "mlp":
            for ax in s.axes:
                t = state[ax.param]
                state[ax.param] = torch.cat([t, t], ax.dim) / (2 if ax.io == "in" else 1)
    wide.load_state_dict(state)
    return wide


@pytest.mark.parametrize("fam", ["vit", "llama"])
def test_heterogeneous_width_takes_the_anchor_shape_with_barycentric_marginals(fam):
    """A 2x-wide copy (each MLP neuron twice) fused into its narrow original with EMD gives the
    original exactly: each anchor neuron gets the *mean* of its two copies (column-normalised
    plan). With the reference code's T*n0 on the output side the fc1 rows would come out doubled."""
    a = build_tiny(fam, layers=2)
    wide = _widened(a, fam)
    torch.testing.assert_close(_out(wide, fam), _out(a, fam), atol=PERM_ATOL, rtol=0)
    fused, ctx = _fuse([wide, a], fam, solver="emd")
    assert _max_diff(fused, a) <= EXACT_ATOL
    assert result_dump(ctx.result)["config"]["intermediate_size"] == a.config.intermediate_size
    with pytest.raises(SqueezeError, match="vanilla averaging"):
        _fuse([wide, a], fam, solver="none")


def _save_like(model, src, folder):
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def pair(tiny_dirs, tmp_path_factory):
    """gpt2 (Conv1D, fused qkv, tied head): A (the session tiny model) and B = perm(A), as folders."""
    root = tmp_path_factory.mktemp("fuse")
    a = load(tiny_dirs["gpt2"]).model
    return tiny_dirs["gpt2"], _save_like(_permuted(a)[0], tiny_dirs["gpt2"], root / "b")


def test_cli_fuse_save_reload_export(pair, tmp_path):
    from squeeze.compress.export import export_onnx

    a, b = pair
    out = tmp_path / "fused"
    code = main(["fuse", str(a), str(b), "-o", str(out), "--solver", "emd", "--samples", "4", "--seq-len", "16"])
    assert code == 0
    fused = load(out)
    assert fused.manifest.edits[-1]["result"]["anchor"] == 1
    assert _max_diff(fused.model, load(b).model) <= EXACT_ATOL
    row = fused.manifest.ledger[-1]  # the ledger puts vanilla averaging beside OT (fidelity against A)
    assert row["fidelity"]["top1"] == 1.0 > row["metrics"]["fuse"]["vanilla_fidelity"]["top1"]
    again = load(out)
    torch.testing.assert_close(_out(again.model, "gpt2"), _out(fused.model, "gpt2"), atol=0, rtol=0)
    report = export_onnx(fused, tmp_path / "fused.onnx", latency=False)
    assert report["ok"]
    # --anchor names a model however it is spelled: fusing into A returns A
    code = main(["fuse", str(a), str(b), "-o", str(tmp_path / "into_a"), "--anchor", f"{a}/", "--solver", "emd",
                 "--samples", "4", "--seq-len", "16"])  # fmt: skip
    assert code == 0 and _max_diff(load(tmp_path / "into_a").model, load(a).model) <= EXACT_ATOL


def test_heterogeneous_result_reloads_in_the_anchor_shape(tmp_path):
    """Anchor is not the first model and has another width: the manifest's base is the first
    model, so the reload must rebuild the anchor's shape from the edit (restructure)."""
    a = build_tiny("vit", layers=2)
    wide = _widened(build_tiny("vit", layers=2, seed=4), "vit")
    fused, ctx = _fuse([wide, a], "vit", solver="sinkhorn")
    pass_ = get_pass("fuse")(solver="sinkhorn")
    edit = Edit(pass_name="fuse", config=pass_.config.model_dump(mode="json"), result=result_dump(ctx.result))
    rebuilt = pass_.restructure(copy.deepcopy(wide), edit, family_for("vit"))
    rebuilt.load_state_dict(fused.state_dict())  # strict: shapes are the anchor's
    torch.testing.assert_close(_out(rebuilt, "vit"), _out(fused, "vit"), atol=0, rtol=0)


def test_refusals_name_the_mismatch_and_write_nothing(pair, tiny_dirs, tmp_path, capsys):
    a, _ = pair
    fewer = _save_like(build_tiny("gpt2", layers=3), a, tmp_path / "fewer")
    vocab = _save_like(build_tiny("gpt2", vocab_size=400), a, tmp_path / "vocab")
    heads = _save_like(build_tiny("gpt2", n_head=2), a, tmp_path / "heads")
    other = _save_like(build_tiny("gpt2", seed=5), a, tmp_path / "other")
    cases = {
        "family": ([a, tiny_dirs["llama"]], [], "family differs"),
        "layers": ([a, fewer], [], "layer count differs: model 1 has 4, model 2 has 3"),
        "vocab": ([a, vocab], [], "vocabulary differs"),
        "heads": ([a, heads], [], "head count differs"),
        "one": ([a], [], "at least two models"),
        "weights": ([a, a], ["--weights", "1,2,3"], "3 values for 2 models"),
        "anchor": ([a, a], ["--anchor", "nope"], "--anchor"),
        "solver": ([a, a], ["--solver", "hungarian"], "--solver"),
        "reg": ([a, a], ["--reg", "0"], "--reg"),
        "underflow": ([a, other], ["--reg", "0.0001"], "Sinkhorn underflowed"),
        "finetune-headless": (
            [tiny_dirs["bert"], tiny_dirs["bert"]],
            ["--finetune-steps", "2"],
            "needs models with a head",
        ),
    }
    for case, (models, extra, words) in cases.items():
        out = tmp_path / f"out_{case}"
        capsys.readouterr()
        code = main(["fuse", *map(str, models), "-o", str(out), "--samples", "4", "--seq-len", "16", *extra])
        err = capsys.readouterr().err
        assert code == 2, (case, err)
        assert words in err and len(err.strip().splitlines()) == 1, (case, err)
        assert not out.exists(), case


def test_recipe_step(pair, tmp_path):
    """``- fuse: {others: [B], solver: emd}``: the engine loads B; the result is B (= perm(A))."""
    a, b = pair
    recipe = tmp_path / "fuse.yaml"
    recipe.write_text(f"""version: 1
defaults:
  calibration: {{source: builtin, samples: 4, seq_len: 16, eval_samples: 4}}
jobs:
  - name: f
    model: {a}
    steps:
      - fuse: {{others: [{b}], solver: emd}}
""")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 0
    assert _max_diff(load(tmp_path / "out" / "f" / "01-fuse").model, load(b).model) <= EXACT_ATOL
