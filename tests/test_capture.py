"""compress/capture.py: the layer-by-layer walk sees what a full forward sees, in O(L) forwards."""

from __future__ import annotations

import pytest
import torch
from tiny import build_tiny

from squeeze.compress.capture import Layerwise, layer_calls, record
from squeeze.compress.families import FAMILIES

FAMS = ("bert", "vit", "llama", "gpt2")


def _batches(name: str, n: int = 2):
    g = torch.Generator().manual_seed(0)
    if name == "vit":
        return [{"pixel_values": torch.randn(2, 3, 16, 16, generator=g)} for _ in range(n)]
    out = []
    for _ in range(n):
        ids = torch.randint(5, 300, (2, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0  # padding: masks must reach every layer
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _full_inputs(model, fam, batches):
    """The input of every layer under ordinary full forwards (hooks), per layer per batch."""
    layers = fam.layers(model)
    with record({str(i): m for i, m in enumerate(layers)}, what="input") as seen, torch.no_grad():
        for b in batches:
            fam.forward(model, b)
    return [seen[str(i)] for i in range(len(layers))]


@pytest.mark.parametrize("name", FAMS)
def test_walk_inputs_equal_full_forward_inputs(name):
    model, fam = build_tiny(name), FAMILIES[name]
    batches = _batches(name)
    want = _full_inputs(model, fam, batches)
    walk = Layerwise(model, fam, batches)
    seen = 0
    for i in walk:
        for b in range(len(batches)):
            assert torch.equal(walk.inputs[b], want[i][b]), (name, i, b)
        seen += 1
    assert seen == fam.num_layers(model)
    assert walk.forwards == seen - 1  # O(L): each layer runs once per batch, the last not at all


@pytest.mark.parametrize("name", ("bert", "llama"))
def test_a_change_inside_the_body_reaches_the_next_layer(name):
    model, fam = build_tiny(name), FAMILIES[name]
    teacher = build_tiny(name)
    batches = _batches(name)
    walk = Layerwise(model, fam, batches, teacher=teacher)
    for i in walk:
        if i == 1:
            out = fam.role(walk.layer, "attn_out")
            with torch.no_grad():
                out.weight.mul_(0.5)
            outs = walk.run()
            walk.keep(outs)
        if i == 2:
            got, got_teacher = [t.clone() for t in walk.inputs], [t.clone() for t in walk.teacher_inputs]
            break
    want = _full_inputs(model, fam, batches)[2]  # the changed model, full forwards
    want_teacher = _full_inputs(teacher, fam, batches)[2]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(got_teacher, want_teacher, strict=True))
    assert not torch.equal(got[0], got_teacher[0])  # the student really changed


def test_teacher_outputs_are_its_next_inputs():
    model, fam = build_tiny("gpt2"), FAMILIES["gpt2"]
    batches = _batches("gpt2")
    walk = Layerwise(model, fam, batches, teacher=build_tiny("gpt2", seed=1))
    prev = None
    for _i in walk:
        if prev is not None:
            assert all(torch.equal(a, b) for a, b in zip(prev, walk.teacher_inputs, strict=True))
        prev = walk.teacher_outputs()


def test_teacher_of_other_depth_is_refused():
    with pytest.raises(ValueError, match="teacher has 2 layers"):
        Layerwise(build_tiny("bert"), FAMILIES["bert"], _batches("bert"), teacher=build_tiny("bert", layers=2))


def test_layer_calls_restore_the_layers_and_carry_masks():
    model, fam = build_tiny("llama"), FAMILIES["llama"]
    before = list(fam.layers(model))
    calls = layer_calls(model, fam, _batches("llama", 3))
    assert [id(m) for m in fam.layers(model)] == [id(m) for m in before]
    assert len(calls) == fam.num_layers(model) and all(len(c) == 3 for c in calls)
    assert "position_embeddings" in calls[2][0].kwargs  # rotary tables reach every layer


def test_record_outputs_and_removes_hooks_on_error():
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError), record({"lin": lin}) as seen:
        lin(x)
        lin(2 * x)
        raise RuntimeError("boom")
    assert len(seen["lin"]) == 2 and torch.equal(seen["lin"][1], lin(2 * x).detach())
    assert not lin._forward_hooks and not lin._forward_pre_hooks
