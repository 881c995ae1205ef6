"""Tests written to fail on one-line bugs in the algorithms (issue 17).

Each test names the planted bug it was checked against (planted by hand in a copy, run, reverted):
prune's consecutive window, iterative block and joint dropping (GPTQ: test_gptq.py);
learned dual clipping; RepQuant's static zero point at W8A8 and W4A4; the reparameterization
fold; V (and Q, K, P) quantized inside attention; decoder KV cache over varied tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch

from squeeze.compress import checkpoint as ck
from squeeze.compress.calibration import DataSpec
from squeeze.compress.passes import PassContext, run_pass
from squeeze.compress.passes.prune import PrunePass, layer_scores
from squeeze.compress.passes.quantize import attention as qattn
from squeeze.compress.passes.quantize import dual_clip, engine, groups, reparam, uniform
from squeeze.compress.passes.quantize.uniform import Grid

SPEC = DataSpec(samples=8, seq_len=16, batch_size=4, eval_samples=4)
S_ONE_TOL = 1e-6  # an identity window gives cos(h, h); measured within 6e-8 of 1 in fp32
RESCORE_TOL = 1e-6  # a re-scored S recomputed on the same partly pruned model: same ops, measured 0
FOLD_TOL = 1e-6  # fold-only reparameterization vs float, relative to the output scale; measured 1.8e-7
CODE_FLIPS = 1  # per-tensor vs per-channel codes: a value within fp error of a .5 boundary may flip; measured 0
CACHE_TOL = 1e-5  # cached incremental logits vs the full no-cache forward; measured 2.1e-7


def _ctx(ckpt) -> PassContext:
    return PassContext(family=ckpt.family, checkpoint=ckpt, calibration=SPEC)


def _scale_branch(fam, layer, which: str, factor: float) -> None:
    """Scale a sublayer's output projection (weight and bias): 0 makes it an exact identity."""
    out = fam.role(layer, "attn_out" if which == "attn" else "mlp_out")
    with torch.no_grad():
        out.weight.mul_(factor)
        if out.bias is not None:
            out.bias.mul_(factor)


# --------------------------------------------------------------------------------------------
# prune: which window / layer each mode picks
# --------------------------------------------------------------------------------------------


def test_consecutive_window_is_the_identity_pair(tiny_dirs):
    """Blocks 1 and 2 zeroed: h_1 == h_3, so the window [1, 2] scores exactly 1.
    Catches: window start off by one, span scored against h_{i+n+1}, span taken from the block list."""
    ckpt = ck.load(tiny_dirs["llama"])
    fam = ckpt.family
    for i in (1, 2):
        for which in ("attn", "mlp"):
            _scale_branch(fam, fam.layers(ckpt.model)[i], which, 0.0)
    plan = PrunePass(drop_blocks=2, consecutive=True).plan(ckpt.model, _ctx(ckpt))
    assert plan.blocks == [1, 2]
    assert abs(plan.scores["span"][1] - 1.0) < S_ONE_TOL
    assert max(s for i, s in enumerate(plan.scores["span"]) if i != 1) < 1.0 - 1e-4


def test_consecutive_window_is_adjacent_even_when_the_best_blocks_are_not(tiny_dirs):
    """Blocks 0 and 3 zeroed: one-shot drop_blocks=2 takes [0, 3]; consecutive must take the
    adjacent window with the highest cos(h_i, h_{i+2}) (recomputed here from full hidden states).
    Catches: the consecutive flag ignored (falls through to the block ranking)."""
    ckpt = ck.load(tiny_dirs["llama"])
    fam = ckpt.family
    for i in (0, 3):
        for which in ("attn", "mlp"):
            _scale_branch(fam, fam.layers(ckpt.model)[i], which, 0.0)
    ctx = _ctx(ckpt)
    assert PrunePass(drop_blocks=2).plan(ckpt.model, ctx).blocks == [0, 3]
    plan = PrunePass(drop_blocks=2, consecutive=True).plan(ckpt.model, ctx)
    span = torch.zeros(3, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for b in ctx.calib_batches():
            kw = {k: v for k, v in b.items() if k in fam.model_inputs}
            hs = ckpt.model(**kw, output_hidden_states=True, use_cache=False).hidden_states
            mask = b["attention_mask"].bool()
            for i in range(2):  # hs[4] carries the final norm; window [2, 3] is checked through the plan
                span[i] += torch.cosine_similarity(hs[i], hs[i + 2], dim=-1)[mask].double().sum()
            count += int(mask.sum())
    for i in range(2):
        assert abs(plan.scores["span"][i] - float(span[i] / count)) < 1e-5
    start = max(range(3), key=lambda i: plan.scores["span"][i])
    assert plan.blocks == [start, start + 1]


def test_iterative_blocks_rescore_and_never_pick_a_block_twice(tiny_dirs):
    """Block 1 nearly an identity (x0.1), block 3 next (x0.3). Round 1 drops block 1; round 2
    must re-score the partly pruned model (block 3's S changes because its input changed) and
    skip block 1, whose identity now scores 1.
    Catches: no re-scoring after a drop, the ``exclude`` of already dropped blocks removed."""
    ckpt = ck.load(tiny_dirs["llama"])
    fam = ckpt.family
    for i, f in ((1, 0.1), (3, 0.3)):
        for which in ("attn", "mlp"):
            _scale_branch(fam, fam.layers(ckpt.model)[i], which, f)
    ctx = _ctx(ckpt)
    plan = PrunePass(drop_blocks=2, iterative=True).plan(ckpt.model, ctx)
    assert [r["layer"] for r in plan.rounds] == [1, 3] and plan.blocks == [1, 3]
    assert {r["kind"] for r in plan.rounds} == {"block"}
    work = copy.deepcopy(ckpt.model)
    for which in ("attn", "mlp"):
        fam.skip_sublayer(fam.layers(work)[1], which, False)
    again = layer_scores(work, fam, ctx.calib_batches())
    assert abs(plan.rounds[1]["S"] - again["block"][3]) < RESCORE_TOL
    assert abs(again["block"][3] - plan.scores["block"][3]) > 1e-5  # the re-score is a different number


def test_iterative_joint_takes_one_sublayer_per_round_of_the_right_kind(tiny_dirs):
    """Attention 1 zeroed (S = 1), MLP 3 next (x0.1): round 1 drops attention 1, round 2
    MLP 3 with its re-scored S; the model equals the one with exactly those two skipped.
    Catches: the kind of a joint pick swapped, a joint index not mapped back (i - L)."""
    ckpt = ck.load(tiny_dirs["llama"])
    fam = ckpt.family
    _scale_branch(fam, fam.layers(ckpt.model)[1], "attn", 0.0)
    _scale_branch(fam, fam.layers(ckpt.model)[3], "mlp", 0.1)
    ctx = _ctx(ckpt)
    new = run_pass(PrunePass(drop_joint=2, iterative=True), [ckpt], ctx, measure_fidelity=False)
    res = new.manifest.edits[-1]["result"]
    assert [(r["kind"], r["layer"]) for r in res["rounds"]] == [("attn", 1), ("mlp", 3)]
    assert (res["attention"], res["mlp"]) == ([1], [3])
    work = copy.deepcopy(ckpt.model)
    fam.skip_sublayer(fam.layers(work)[1], "attn", False)
    again = layer_scores(work, fam, ctx.calib_batches())
    assert abs(res["rounds"][1]["S"] - again["mlp"][3]) < RESCORE_TOL
    fam.skip_sublayer(fam.layers(work)[3], "mlp", False)
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(new.model(ids).logits, work(ids).logits)


# --------------------------------------------------------------------------------------------
# RepQuant: dual clipping, static zero point, fold
# --------------------------------------------------------------------------------------------


def _outlier_acts(n: int = 512, c: int = 16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g)
    x[:, 3] = x[:, 3] * 0.3 + 1.0
    x[::37, 3] += 25.0  # a few huge values in one channel
    w = torch.randn(32, c, generator=g)
    return x, w


def _hard_loss(x, w, lo, hi, bits):
    s, z = uniform.params_from_range(lo, hi, Grid(bits, symmetric=False))
    xq = uniform.fake_quant(x, s, z, Grid(bits, symmetric=False))
    return float((xq @ w.t() - x @ w.t()).pow(2).mean())


@pytest.mark.parametrize("bits", [4, 3])
def test_dual_clipping_strictly_lowers_the_loss_on_an_outlier_channel(bits):
    """Catches: the optimizer step removed / the best point never updated (returns the start)."""
    x, w = _outlier_acts()
    lo0, hi0 = dual_clip.learn_bounds(x, [w], bits, steps=0)
    lo, hi = dual_clip.learn_bounds(x, [w], bits, steps=100)
    assert _hard_loss(x, w, lo, hi, bits) < 0.99 * _hard_loss(x, w, lo0, hi0, bits)
    assert not torch.equal(lo, lo0) or not torch.equal(hi, hi0)


@pytest.mark.parametrize("bits", [8, 4])
def test_reparameterized_codes_equal_per_channel_codes(bits):
    """Per-tensor codes of x' = x / r - delta with (s~, z~) equal per-channel codes of x with
    (s_c, z_c). Catches: z~ left unrounded, delta with the wrong sign, r inverted."""
    x, w = _outlier_acts()
    rp, _ = groups.repquant_reparam(x, [(w, None)], bits, clip_steps=20, symmetric=False, seed=0)
    lo, hi = dual_clip.learn_bounds(x, [w], bits, steps=20)
    grid = Grid(bits, symmetric=False)
    s_c, z_c = uniform.params_from_range(lo, hi, grid)
    assert float(rp.zero) == round(float(rp.zero))
    got = uniform.quantize(x / rp.r - rp.delta, rp.scale, rp.zero, grid)
    want = uniform.quantize(x, s_c, z_c, grid)
    assert int((got != want).sum()) <= CODE_FLIPS


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", ["vit", "bert"])
def test_engine_static_input_codes_equal_per_channel_codes(tiny_dirs, name, bits):
    """Through ``quantize_model`` (static W/A, clipping at its start so the per-channel ranges can
    be recomputed): the integer codes of layer 0's q input equal quantize(x, s_c, z_c) per channel,
    x the float model's input (ViT: folded into the norm; BERT: a ChannelAffine in front).
    Catches: an unrounded z~, the folded norm bias without -delta."""
    ckpt = ck.load(tiny_dirs[name])
    fam = ckpt.family
    batches = _ctx(ckpt).calib_batches()
    scheme = engine.Scheme(
        w_bits=8,
        act="static",
        a_bits=bits,
        method="repquant",
        gptq=False,
        block_size=32,
        embeddings=False,
        clip_steps=0,
        alphas=(0.0,),
        softmax="float",
    )
    floats, quants = _q_inputs(ckpt.model, fam, batches), None
    qmodel = copy.deepcopy(ckpt.model)
    engine.quantize_model(qmodel, fam, batches, scheme)
    quants = _q_inputs(qmodel, fam, batches)
    ql = fam.linears(fam.layers(qmodel)[0])["q"]
    masks = [
        b["attention_mask"].reshape(-1).bool() if "attention_mask" in b else torch.ones(len(x), dtype=torch.bool)
        for b, x in zip(batches, floats, strict=True)
    ]
    real = torch.cat([x[m] for x, m in zip(floats, masks, strict=True)])
    grid = Grid(bits, symmetric=False)
    lo, hi = uniform.search_range(real.t(), grid, per_channel=True)
    s_c, z_c = uniform.params_from_range(lo, hi, grid)
    xq = torch.cat(quants)
    if ql.affine is not None:
        with torch.no_grad():
            xq = ql.affine(xq)
    got = uniform.quantize(xq, ql.a_scale.float(), ql.a_zero.float(), grid)
    want = uniform.quantize(torch.cat(floats), s_c, z_c, grid)
    assert int((got != want).sum()) <= CODE_FLIPS


def _q_inputs(model, fam, batches):
    return _inputs_of(model, fam, batches, fam.linears(fam.layers(model)[0])["q"])


def test_fold_only_equals_float(tiny_dirs):
    """The reparameterization folded into the norm and the consumers, nothing quantized, gives
    the float outputs. Catches: b' = b + W' delta with W instead of W', gamma' without / r."""
    ckpt = ck.load(tiny_dirs["vit"])
    fam = ckpt.family
    model = copy.deepcopy(ckpt.model)
    batches = _ctx(ckpt).calib_batches()
    layer = fam.layers(model)[1]
    group = next(g for g in engine.layer_groups(fam, model, layer) if g.name == "mlp_in")
    x = torch.cat(_inputs_of(model, fam, batches, group.first))
    weights = groups.consumer_weights(group, fam.linear_weight)
    rp, _ = groups.repquant_reparam(x, weights, 4, clip_steps=0, symmetric=False, seed=0)
    assert float(rp.delta.abs().max()) > 0 and float((rp.r - 1).abs().max()) > 0.1  # a real transform
    reparam.fold_into_norm(group.norm, rp.r, rp.delta)
    for mod in group.modules:
        w, b = reparam.fold_into_consumer(fam.linear_weight(mod).float(), mod.bias.float(), rp.r, rp.delta)
        fam.set_linear_weight(mod, w)
        with torch.no_grad():
            mod.bias.copy_(b)
    kw = {k: v for k, v in batches[0].items() if k in fam.model_inputs}
    with torch.no_grad():
        want, got = ckpt.model(**kw).last_hidden_state, model(**kw).last_hidden_state
    assert float((got - want).abs().max()) < FOLD_TOL * float(want.abs().max())


def _inputs_of(model, fam, batches, mod):
    seen: list[torch.Tensor] = []
    h = mod.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).detach()))
    with torch.no_grad():
        for b in batches:
            model(**{k: v for k, v in b.items() if k in fam.model_inputs})
    h.remove()
    return seen


# --------------------------------------------------------------------------------------------
# Attention operands, KV cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softmax", ["uniform", "logsqrt2"])
def test_attention_quantizes_q_k_v_and_probs(softmax):
    """The quantized attention equals a hand computation with Q, K, V fake-quantized per tensor.
    Catches: V (or Q, K) left float, the probabilities not quantized."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) * (1 + i) for i in range(3))
    mod = torch.nn.Module()
    st = qattn.AttnQuant(4, softmax)
    mod.add_module(qattn.CHILD, st)
    st.observing = True
    qattn.attention(mod, q, k, v, None)
    st.calibrate("minmax")
    out, _ = qattn.attention(mod, q, k, v, None)
    grid = Grid(4, symmetric=False)

    def fq(t, name):
        return uniform.fake_quant(t, getattr(st, f"{name}_scale"), getattr(st, f"{name}_zero").float(), grid)

    probs = torch.softmax(fq(q, "q") @ fq(k, "k").transpose(-1, -2) * 8**-0.5, dim=-1)
    if softmax == "uniform":
        probs = fq(probs, "p")
    else:
        probs = torch.ops.squeeze.logsqrt2_softmax(fq(q, "q") @ fq(k, "k").transpose(-1, -2) * 8**-0.5, st.p_scale, 4)
    want = (probs @ fq(v, "v")).transpose(1, 2)
    assert torch.allclose(out, want, atol=1e-6)
    float_v = (probs @ fq(v, "v").mul(0).add(v)).transpose(1, 2)
    assert not torch.allclose(out, float_v, atol=1e-3)  # V's quantization is visible at 4 bits


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cached_logits_equal_full_forward_over_varied_tokens(tiny_dirs, name):
    """After dropping attention 0 and 2: logits fed token by token through the KV cache equal the
    no-cache forward over 20 varied tokens, a left-padded row included.
    Catches: a kept layer writing into another layer's cache slot, positions not advanced."""
    ckpt = ck.load(tiny_dirs[name])
    new = run_pass(PrunePass(attn_layers=[0, 2]), [ckpt], _ctx(ckpt), measure_fidelity=False)
    model = new.model
    ids = torch.randint(5, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    assert len(set(ids[0].tolist())) > 15
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        out = model(ids[:, :4], attention_mask=mask[:, :4], position_ids=pos[:, :4], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(4, ids.shape[1]):
            out = model(
                ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                position_ids=pos[:, t : t + 1],
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            steps.append(out.logits)
    inc = torch.cat(steps, dim=1)
    real = mask.bool()
    assert float((inc - full)[real].abs().max()) < CACHE_TOL
