"""Behaviour tests for fuse written against its mutation-testing survivors (issue 17).

Each test names the one-line bug it catches: the fine-tune after fusion never run or run for the
wrong number of steps, the plan sharpness of only the last aligned model, the anchor's config
recorded for a same-shape fusion, and the anchor named off by one in the summary.
"""

from __future__ import annotations

import pytest
import torch
from test_fuse import _fuse, _permuted
from tiny import build_tiny

from squeeze.compress.passes.base import result_dump

FINETUNE_STEPS = 2
ROUNDING = 1e-4  # the result stores the plan sharpness rounded to 4 decimals


@pytest.fixture(scope="module")
def llamas():
    a = build_tiny("llama", layers=1)
    b = build_tiny("llama", layers=1, seed=7)
    c = build_tiny("llama", layers=1, seed=11)
    return a, b, c


def test_finetune_after_fusion_runs_the_steps_asked(llamas):
    """``finetune_steps`` distills the fused model from its parents for exactly that many steps
    and changes it (bugs: the fine-tune skipped, its parents dropped, its step count ignored)."""
    a, b, _ = llamas
    plain, _ = _fuse([a, b], "llama", solver="emd")
    tuned, ctx = _fuse([a, b], "llama", solver="emd", finetune_steps=FINETUNE_STEPS, finetune_lr=1e-2)
    res = result_dump(ctx.result)
    assert res["finetune"] is not None and res["finetune"]["steps"] == FINETUNE_STEPS
    s0, s1 = plain.state_dict(), tuned.state_dict()
    assert any(not torch.equal(s0[k], s1[k]) for k in s0 if s0[k].is_floating_point())


def test_plan_sharpness_averages_over_every_aligned_model(llamas):
    """With three models the sharpness is the mean over both aligned models' plans, each of which
    is aligned to the anchor on its own (bug: only the last model's plans kept)."""
    a, b, c = llamas
    sharp = {}
    for name, models in (("a", [a, c]), ("b", [b, c]), ("ab", [a, b, c])):
        sharp[name] = result_dump(_fuse(models, "llama", solver="sinkhorn")[1].result)["plan_sharpness"]
    assert abs(sharp["a"] - sharp["b"]) > 4 * ROUNDING  # the two models align differently
    assert sharp["ab"] == pytest.approx((sharp["a"] + sharp["b"]) / 2, abs=ROUNDING)


def test_same_shape_fusion_records_no_config_and_names_the_anchor(llamas):
    """Fusing models of one shape keeps the input's config (none recorded); the summary names the
    anchor by its 1-based position (bugs: config always recorded, anchor number off by one)."""
    a, _, _ = llamas
    b, _ = _permuted(a, seed=3)
    _, ctx = _fuse([a, b], "llama", solver="emd", anchor=0)
    assert result_dump(ctx.result)["config"] is None
    assert "into model 1's shape" in ctx.result.summary()[0]


def test_refusals_name_what_differs():
    """Vision models of another image size, and rotary models of another head size, are refused
    with a message naming the mismatch (bugs: the wrong label, an empty message)."""
    from squeeze.compress.errors import SqueezeError
    from squeeze.compress.families import family_for
    from squeeze.compress.passes import get_pass
    from squeeze.compress.passes.fuse.compat import check_compatible

    with pytest.raises(SqueezeError, match="image size differs"):
        check_compatible([build_tiny("vit"), build_tiny("vit", image_size=32)])
    a, wide = build_tiny("llama"), build_tiny("llama", hidden_size=64, head_dim=16)
    assert wide.config.head_dim != a.config.head_dim  # same head count, another head size
    with pytest.raises(SqueezeError, match="head size differs"):
        get_pass("fuse")().check(family_for("llama"), [wide, a])
