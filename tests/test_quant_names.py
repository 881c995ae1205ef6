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
