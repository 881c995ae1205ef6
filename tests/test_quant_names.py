"""Recorded names say what ran (issue 17): ``--method repquant`` with dynamic activations is
SmoothQuant-style smoothing plus GPTQ, not RepQuant; BCT is partial; the MLP-output reparameterization is squeeze's extension."""

from __future__ import annotations

import pytest

from squeeze.compress.passes.quantize import names


@pytest.mark.parametrize(
    "method,act,gptq,want",
    [
        ("repquant", "dynamic", True, "smoothquant+gptq"),
        ("repquant", "dynamic", False, "smoothquant+rtn"),
        ("repquant", "none", True, "percentile+gptq"),
        ("repquant", "static", True, "repquant"),
        ("repquant", "static", False, "repquant+rtn"),
        ("bct", "block", False, "bct-partial"),
        ("minmax", "static", False, "minmax"),
        ("percentile", "dynamic", False, "percentile"),
    ],
)
def test_algorithm_names(method, act, gptq, want):
    assert names.algorithm(method, act, gptq) == want


def test_only_static_repquant_carries_the_mlp_out_extension():
    assert names.extensions("repquant", "static") == [names.MLP_OUT_EXTENSION]
    assert names.extensions("repquant", "dynamic") == names.extensions("bct", "block") == []
    assert "2304.01483" in names.BCT_PAPER


def test_the_default_run_is_recorded_as_smoothquant_gptq(tiny_dirs):
    """The ledger and the summary of a default ``quantize`` say what ran."""
    from squeeze.compress import checkpoint as ck
    from squeeze.compress.calibration import DataSpec
    from squeeze.compress.passes import PassContext, run_pass
    from squeeze.compress.passes.quantize import QuantizePass

    ckpt = ck.load(tiny_dirs["bert"])
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=DataSpec(samples=4, seq_len=16, batch_size=4))
    new = run_pass(QuantizePass(), [ckpt], ctx, measure_fidelity=False)
    scheme = new.manifest.ledger[-1]["metrics"]["scheme"]
    assert (scheme["method"], scheme["algorithm"], scheme["extensions"]) == ("repquant", "smoothquant+gptq", [])
