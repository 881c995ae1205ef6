"""The ledger's fidelity numbers on logits: KL, top-1 and perplexity, checked against their formulas
(and independent of how many rows compare_outputs takes at a time)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from squeeze.compress import evaluate
from squeeze.compress.evaluate import Reference, compare_outputs
from squeeze.compress.families import FAMILIES


def _refs():
    g = torch.Generator().manual_seed(3)
    fam = FAMILIES["llama"]
    batches, ref_out, new_out = [], [], []
    for _ in range(2):
        ids = torch.randint(0, 50, (3, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0  # a padded row: its padded positions count nowhere
        batches.append({"input_ids": ids, "attention_mask": mask})
        r = torch.randn(3, 7, 50, generator=g)
        ref_out.append({"logits": r})
        new_out.append({"logits": r + 0.3 * torch.randn(3, 7, 50, generator=g)})
    return Reference(fam, ref_out, batches), Reference(fam, new_out, batches)


def _expected(ref, new):
    kl = agree = n_tok = 0.0
    nll_r = nll_n = 0.0
    n_lm = 0
    for r, n, b in zip(ref.outputs, new.outputs, ref.batches, strict=True):
        m = b["attention_mask"].bool()
        vr, vn = r["logits"][m].double(), n["logits"][m].double()
        p, q = vr.log_softmax(-1), vn.log_softmax(-1)
        kl += float((p.exp() * (p - q)).sum())
        agree += float((vr.argmax(-1) == vn.argmax(-1)).sum())
        n_tok += vr.shape[0]
        lm = m[:, 1:]
        for lg, acc in ((r["logits"], "r"), (n["logits"], "n")):
            ce = F.cross_entropy(
                lg[:, :-1].reshape(-1, 50).double(), b["input_ids"][:, 1:].reshape(-1), reduction="none"
            )
            s = float(ce[lm.reshape(-1)].sum())
            nll_r, nll_n = (nll_r + s, nll_n) if acc == "r" else (nll_r, nll_n + s)
        n_lm += int(lm.sum())
    return kl / n_tok, agree / n_tok, math.exp(nll_r / n_lm), math.exp(nll_n / n_lm)


@pytest.mark.parametrize("rows", [1, 4, 256])
def test_logit_fidelity_matches_the_formulas_in_any_chunking(monkeypatch, rows):
    monkeypatch.setattr(evaluate, "ROWS", rows)
    ref, new = _refs()
    kl, top1, ppl_ref, ppl = _expected(ref, new)
    got = compare_outputs(ref, new)
    assert got["kl"] == pytest.approx(kl, rel=1e-5) and kl > 0.01
    assert got["top1"] == pytest.approx(top1, abs=1e-6) and 0 < top1 < 1
    assert got["ppl_ref"] == pytest.approx(ppl_ref, rel=1e-4) and got["ppl"] == pytest.approx(ppl, rel=1e-4)
    assert got["ppl"] != got["ppl_ref"]
