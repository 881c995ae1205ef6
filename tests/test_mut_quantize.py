"""``quantize``: behaviour the mutation run of passes/quantize found untested (issue 17).

Static activation ranges use min/max for minmax and BCT and RepQ-ViT's search otherwise; the
SmoothQuant strength search thins its rows when there are more than ``max_rows`` and still picks
the alpha the full search picks; the ONNX validation check fails a graph whose output deviates;
a rule exists for every supported width and loosens as the width drops.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from squeeze.compress import checkpoint as ck
from squeeze.compress.calibration import DataSpec
from squeeze.compress.passes import PassContext, run_pass
from squeeze.compress.passes.base import ExportRule
from squeeze.compress.passes.quantize import QuantizePass, onnx_check, uniform
from squeeze.compress.passes.quantize import groups as G
from squeeze.compress.passes.quantize.uniform import Grid

THIN_TOL = 0.25  # relative error of a 1-in-4 row sample vs all rows on iid data; measured 0.02-0.08


def _outlier_activations(seed: int = 0, rows: int = 512, cols: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    x[3, 5] = 60.0  # one outlier: min/max would spend the whole grid on it
    return x


def test_static_range_minmax_and_bct_take_min_max_others_search():
    x, bits = _outlier_activations(), 4  # at 4 bits the 60.0 outlier costs min/max more than clipping it
    grid = Grid(bits, symmetric=False)
    full = uniform.params_from_range(x.min(), x.max(), grid)
    searched = uniform.params_from_range(*uniform.search_range(x, grid), grid)
    for method in ("minmax", "bct"):
        s, z = G.static_range(x, bits, method)
        assert torch.equal(s, full[0]) and torch.equal(z, full[1])
    s, z = G.static_range(x, bits, "repquant")
    assert torch.equal(s, searched[0]) and torch.equal(z, searched[1])
    assert s < full[0]  # the search clips the outlier: a finer step
    err = {k: float((uniform.fake_quant(x, *p, grid) - x).pow(2).mean()) for k, p in (("mm", full), ("s", (s, z)))}
    assert err["s"] < err["mm"]


def test_smoothing_search_thins_rows_and_keeps_the_choice():
    """More rows than max_rows: every step-th row is used; the pick equals the full search's."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 16, generator=g) for _ in range(2)]
    for b in batches:
        b[:, 2] *= 40.0  # an outlier channel: smoothing (alpha > 0) clearly helps
    weights = [(torch.randn(8, 16, generator=g), None), (torch.randn(12, 16, generator=g), None)]
    alphas = (0.0, 0.5, 0.8)
    r_all, a_all, e_all = G.smoothing_search(batches, weights, 8, alphas, 10**6)
    r_thin, a_thin, e_thin = G.smoothing_search(batches, weights, 8, alphas, 32)  # 128 rows -> every 4th
    assert a_all == a_thin and a_all > 0.0
    assert torch.equal(r_all, r_thin)  # r depends on the full batches' maxima only
    for a in alphas:
        assert abs(e_thin[a] - e_all[a]) <= THIN_TOL * e_all[a]
    assert e_thin != e_all  # the thinned rows really are a subset


def test_onnx_check_fails_a_deviating_graph():
    rng = np.random.default_rng(0)
    twin = rng.standard_normal((2, 8, 16)).astype(np.float32)
    rule = onnx_check.rule_for(8, "dynamic", 8)
    good = onnx_check.check(twin + 1e-4 * rng.standard_normal(twin.shape), twin, rule)
    assert good["ok"] and good["cosine"] > 0.9999 and good["max_abs_ratio"] < 0.01
    bad = onnx_check.check(-twin, twin, rule)
    assert not bad["ok"] and bad["cosine"] < -0.99
    assert not onnx_check.check(twin * np.float32(np.nan), twin, rule)["ok"]


def test_a_rule_for_every_width_loosening_as_bits_drop():
    rules = [ExportRule(**onnx_check.rule_for(w, "static", a)) for w, a in ((8, 8), (6, 8), (4, 8), (3, 8), (2, 2))]
    cosines = [r.min_cosine for r in rules]
    assert cosines == sorted(cosines, reverse=True) and 0.0 < cosines[-1] < cosines[0]
    assert rules[3].min_cosine == rules[2].min_cosine  # below 4 bits: the 4-bit bound, not stricter or none
    weight_only = ExportRule(**onnx_check.rule_for(4, "none", 16))
    assert weight_only.min_cosine > rules[0].min_cosine and weight_only.max_abs_ratio < rules[0].max_abs_ratio


def test_auto_softmax_is_log_sqrt2_only_for_repquant_up_to_8_bits():
    def softmax(**kw) -> str:
        return QuantizePass(**kw).scheme().softmax

    assert softmax(activations="int8") == "logsqrt2"
    assert softmax(activations="int8", method="minmax") == "uniform"
    assert softmax(activations="int8", method="percentile") == "uniform"
    assert softmax(weights="int8", activations="int16") == "uniform"  # log-sqrt2 is coarser above 8 bits
    assert softmax(activations="int8", method="minmax", softmax="float") == "float"


def test_family_warnings_reach_the_run(tiny_dirs):
    """Dynamic repquant on grouped-query attention: the v-fold caveat is a warning of the run."""
    ckpt = ck.load(tiny_dirs["llama"])
    ctx = PassContext(
        family=ckpt.family, checkpoint=ckpt, calibration=DataSpec(samples=4, seq_len=16, batch_size=4, eval_samples=4)
    )
    run_pass(QuantizePass(), [ckpt], ctx, measure_fidelity=False)
    assert any(w.startswith("grouped-query attention shares v between heads") for w in ctx.warnings), ctx.warnings
    assert None not in ctx.warnings


def test_bct_embedding_tables_get_one_range_per_block(tiny_dirs):
    """BCT: each block of embedding columns has its own min/max range; other methods one per table."""
    from squeeze.compress.passes.quantize.engine import quantize_embeddings
    from squeeze.compress.passes.quantize.modules import QuantEmbedding

    ckpt = ck.load(tiny_dirs["bert"])
    fam, model = ckpt.family, ckpt.model
    key, emb = next(iter(fam.embedding_tables(model)))
    w = emb.weight.detach().float().clone()
    grid = Grid(8, symmetric=False)
    scheme = QuantizePass(weights="int8", activations="int8", method="bct", block_size=8).scheme()
    spec = quantize_embeddings(model, fam, scheme)[key]
    assert spec["blocks"] == w.shape[1] // 8 == 4
    (table,) = [m for m in model.modules() if isinstance(m, QuantEmbedding) and m.qweight.shape == w.shape]
    want = [uniform.params_from_range(c.min(), c.max(), grid)[0] for c in w.split(8, dim=1)]
    assert torch.allclose(table.scale.float().reshape(-1), torch.stack(want))
    assert len(set(table.scale.reshape(-1).tolist())) == 4

    plain = ck.load(tiny_dirs["bert"])
    spec = quantize_embeddings(plain.model, fam, QuantizePass(activations="int8", method="minmax").scheme())[key]
    assert spec["blocks"] == 1


def test_bad_bit_width_message():
    with pytest.raises(ValueError) as err:
        QuantizePass(weights="int1")
    assert "weights: expected int2..int16 (int8, int6, int4), got 'int1'" in str(err.value)
    with pytest.raises(ValueError) as err:
        QuantizePass(activations="int32")
    assert "activations: expected int2..int16 (int8, int6, int4) or dynamic|none, got 'int32'" in str(err.value)


DYNAMIC_MIN_COS = 0.9995  # tiny BERT, int8 dynamic smoothquant+gptq vs float: measured cos_mean 0.999985


def test_dynamic_smoothing_folds_into_the_value_producer_exactly(tiny_dirs):
    """BERT's attention output is smoothed by folding 1/r into the value projection (weights and
    bias): the search picks alpha > 0 there, and the quantized model still matches the float one."""
    ckpt = ck.load(tiny_dirs["bert"])
    seen: list[tuple[str, int, int]] = []
    ctx = PassContext(
        family=ckpt.family,
        checkpoint=ckpt,
        calibration=DataSpec(samples=8, seq_len=16, batch_size=4, eval_samples=4),
        progress=lambda *a: seen.append(a),
    )
    new = run_pass(QuantizePass(), [ckpt], ctx, measure_fidelity=True)
    entry = new.manifest.ledger[-1]
    groups = entry["metrics"]["groups"] if isinstance(entry, dict) else entry.metrics["groups"]
    fidelity = entry["fidelity"] if isinstance(entry, dict) else entry.fidelity
    for i in range(4):
        g = groups[f"{i}.attn_out"]
        assert g["where"] == "producer" and g["alpha"] > 0 and g["err"] < g["err_alpha0"]
    assert fidelity["cos_mean"] > DYNAMIC_MIN_COS, fidelity
    # one walk over the layers, reported as it goes: O(L) layer forwards, one progress tick per layer
    metrics = entry["metrics"] if isinstance(entry, dict) else entry.metrics
    assert isinstance(metrics["layer_forwards"], int) and 4 <= metrics["layer_forwards"] <= 2 * 4
    assert [t for t in seen if t[0] == "quantize layers"] == [("quantize layers", i, 4) for i in range(5)]
