"""Behaviour tests for reparam written against its mutation-testing survivors (issue 17).

Each test names the one-line bug it catches: ``--norms all`` leaving out the final norm, the
token count of a layer called with keyword arguments, the SLA product order, and the error for an
empty training source.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny import make_tiny
from torch import nn

import squeeze.compress as ck
import squeeze.compress.train_data as train_data
from squeeze.compress.errors import SqueezeError
from squeeze.compress.passes import PassContext, run_pass
from squeeze.compress.passes.reparam.placement import FINAL, sites
from squeeze.compress.passes.reparam.reparam import ReparamPass
from squeeze.compress.passes.reparam.sla import count_tokens, sla_core


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return ck.load(make_tiny("llama", tmp_path_factory.mktemp("mut_reparam") / "llama"))


def test_all_norm_sites_include_the_final_norm(llama):
    """``all`` is every attention and MLP norm plus the final one (bug: ``all`` without the final)."""
    fam, model = llama.family, llama.model
    every = sites(fam, model, "all")
    assert sites(fam, model, "final") == [FINAL] and FINAL in every
    parts = sites(fam, model, "attn") + sites(fam, model, "mlp") + [FINAL]
    assert sorted(every) == sorted(parts) and len(every) == len(set(every))


class _KwargLayer(nn.Module):
    def forward(self, hidden_states):
        return hidden_states


class _KwargModel(nn.Module):
    """A model that calls its first layer with ``hidden_states=`` only (no positional input)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.layer = _KwargLayer()

    def forward(self, input_ids):
        return self.layer(hidden_states=self.emb(input_ids))


def test_count_tokens_reads_a_keyword_input():
    """N comes from the layer's input whether it is passed by position or by keyword
    (bug: the keyword branch reading nothing)."""
    model = _KwargModel()
    fam = SimpleNamespace(layers=lambda m: [m.layer])
    batch = {"input_ids": torch.zeros(3, 7, dtype=torch.long), "labels": torch.zeros(3)}
    assert count_tokens(fam, model, batch) == 7  # type: ignore[arg-type]


def _orders(n: int):
    g = torch.Generator().manual_seed(n)
    q, k = F.relu(torch.randn(2, n, 4, generator=g)), F.relu(torch.randn(2, n, 4, generator=g))
    v = torch.randn(2, n, 4, generator=g)
    z = 1.0 / (q @ k.sum(dim=-2).unsqueeze(-1) + 1e-6)
    linear = (q @ (k.transpose(-2, -1) @ v)) * z
    quadratic = ((q @ k.transpose(-2, -1)) @ v) * z
    assert not torch.equal(linear, quadratic)  # the two orders round differently: they can be told apart
    return (q, k, v), linear, quadratic


def test_sla_core_takes_the_order_asked_and_auto_picks_the_cheaper():
    """Explicit orders are obeyed; ``auto`` (the default) is linear in N for long sequences and
    quadratic for short ones (bugs: ``auto`` or ``linear`` never recognised)."""
    qkv, linear, quadratic = _orders(64)  # N^2 (c + d) > 2 c d N: linear is cheaper
    assert torch.equal(sla_core(*qkv, "linear"), linear)
    assert torch.equal(sla_core(*qkv, "quadratic"), quadratic)
    assert torch.equal(sla_core(*qkv), linear)
    qkv, linear, quadratic = _orders(3)  # 9 * 8 < 2 * 16 * 3: quadratic is cheaper
    assert torch.equal(sla_core(*qkv, "auto"), quadratic)
    assert torch.equal(sla_core(*qkv, "linear"), linear)


def test_empty_training_source_is_a_user_error(llama, monkeypatch):
    """An empty data source stops the pass with a one-line error that names the cause."""
    monkeypatch.setattr(train_data, "training_batches", lambda *a, **kw: [])
    ctx = PassContext(family=llama.family, checkpoint=llama)
    with pytest.raises(SqueezeError, match="no training batches"):
        run_pass(ReparamPass(steps=1, data="builtin", samples=4), [llama], ctx, measure_fidelity=False)
