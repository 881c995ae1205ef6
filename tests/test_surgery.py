"""compress/surgery.py: module replacement, (out, in) weights, affine folds."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from squeeze.compress import surgery as S


def test_conv1d_weight_is_out_in_and_as_linear_is_the_same_function():
    torch.manual_seed(0)
    conv = Conv1D(5, 3)  # in 3, out 5; weight stored (3, 5)
    nn.init.normal_(conv.bias)
    assert S.linear_weight(conv).shape == (5, 3)
    S.set_linear_weight(conv, torch.arange(15.0).reshape(5, 3))
    assert conv.weight[2, 1] == 5.0  # (in=2, out=1) <- row 1, column 2 of (out, in)
    x = torch.randn(4, 3)
    assert torch.allclose(S.as_linear(conv)(x), conv(x), atol=1e-6)
    lin = nn.Linear(3, 5)
    assert S.as_linear(lin) is lin


def test_replace_module_keeps_dtype_and_returns_the_old():
    root = nn.Sequential(nn.Linear(2, 2).double(), nn.ReLU())
    old = S.replace_module(root, "0", nn.Linear(2, 2))
    assert isinstance(old, nn.Linear) and root[0] is not old
    assert root[0].weight.dtype == torch.float64
    with pytest.raises(ValueError):
        S.set_module(root, "", nn.ReLU())


def test_affine_folds_are_exact():
    torch.manual_seed(0)
    norm, fc = nn.LayerNorm(6), nn.Linear(6, 4)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(8, 6, dtype=torch.float64)
    norm, fc = norm.double(), fc.double()
    want = fc(norm(x))
    r = torch.rand(6, dtype=torch.float64) + 0.5
    delta = torch.randn(6, dtype=torch.float64)
    w, b = S.fold_into_consumer(S.linear_weight(fc), fc.bias, r, delta)
    S.fold_into_norm(norm, r, delta)
    got = norm(x) @ w.T + b
    assert torch.allclose(got, want, atol=1e-12)


def test_rmsnorm_refuses_a_shift():
    norm = nn.RMSNorm(4)
    with pytest.raises(ValueError, match="no bias"):
        S.fold_into_norm(norm, torch.ones(4), torch.ones(4))
    S.fold_into_norm(norm, 2 * torch.ones(4), torch.zeros(4))
    assert torch.equal(norm.weight, torch.full((4,), 0.5))
