"""squeeze distill: the training engine (compress/distill.py), its data, the pass and the CLI."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from tiny import build_tiny

from squeeze.compress.distill import DistillConfig, distill, lr_at, micro_order, select_parameters
from squeeze.compress.distill_losses import model_targets, output_loss, soft_kl
from squeeze.compress.families import FAMILIES
from squeeze.compress.passes.base import PassContext

ENGINE_FAMILIES = ("bert", "vit", "llama", "gpt2")


def toy_batches(name: str, n: int, seed: int, batch: int = 4, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    """Random inputs for a tiny model (the engine needs no tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return [{"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)} for _ in range(n)]
    out = []
    for _ in range(n):
        ids = torch.randint(5, 384, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, seq // 2 :] = 0  # one padded row: losses must respect the mask
        b = {"input_ids": ids, "attention_mask": mask}
        if name == "bert":
            b["token_type_ids"] = torch.zeros_like(ids)
        out.append(b)
    return out


def held_apart_error(student, teacher, name: str, data) -> float:
    """The family's output error on batches never trained on: KL (T = 1) on logits, 1 - cosine
    + normalised MSE on embeddings."""
    fam = FAMILIES[name]
    errs = []
    with torch.no_grad():
        for b in data:
            errs.append(float(output_loss(model_targets(student, fam, b), model_targets(teacher, fam, b), 1.0)))
    return sum(errs) / len(errs)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ENGINE_FAMILIES)
def test_student_equal_to_teacher_gets_zero_loss_and_keeps_its_weights(name):
    teacher = build_tiny(name)
    student = copy.deepcopy(teacher)
    before = state(student)
    cfg = DistillConfig(steps=3, lr=1e-2, hidden_weight=1.0, layers_weight=1.0, weight_decay=0.0)
    res = distill(student, teacher, toy_batches(name, 2, 0), cfg, PassContext(family=FAMILIES[name]))
    assert res.loss_first == 0.0 and res.loss_last == 0.0
    assert all(v == 0.0 for _, v in res.loss_curve)
    assert same_state(before, state(student))


@pytest.mark.parametrize("name", ENGINE_FAMILIES)
def test_distillation_heals_a_dropped_block_on_held_apart_data(name):
    fam = FAMILIES[name]
    teacher = build_tiny(name)
    student = copy.deepcopy(teacher)
    fam.remove_layers(student, [1])
    train, held = toy_batches(name, 6, seed=1), toy_batches(name, 3, seed=2)
    before = held_apart_error(student, teacher, name, held)
    cfg = DistillConfig(steps=12, lr=1e-3, layers_weight=1.0, seed=0)
    distill(student, teacher, train, cfg, PassContext(family=fam), layer_map=[0, 2, 3])
    after = held_apart_error(student, teacher, name, held)
    assert after < before, (before, after)


def test_teacher_is_left_frozen_and_flags_are_restored():
    teacher = build_tiny("bert")
    student = copy.deepcopy(teacher)
    FAMILIES["bert"].remove_layers(student, [2])
    t_before = state(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    distill(
        student,
        teacher,
        toy_batches("bert", 2, 0),
        DistillConfig(steps=2, lr=1e-2, trainable="norms"),
        PassContext(family=FAMILIES["bert"]),
    )
    assert same_state(t_before, state(teacher)) and not teacher.training
    assert all(p.requires_grad for p in student.parameters())


def test_norms_only_trains_only_norm_parameters():
    fam = FAMILIES["llama"]
    teacher = build_tiny("llama")
    student = copy.deepcopy(teacher)
    fam.remove_layers(student, [1])
    before = state(student)
    distill(
        student,
        teacher,
        toy_batches("llama", 2, 0),
        DistillConfig(steps=2, lr=1e-2, trainable="norms"),
        PassContext(family=fam),
    )
    after = state(student)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("norm" in k for k in changed), changed


def test_train_layers_limits_training_to_those_layers():
    fam = FAMILIES["gpt2"]
    teacher = build_tiny("gpt2")
    student = copy.deepcopy(teacher)
    fam.remove_layers(student, [1])
    names = [n for n, _ in select_parameters(student, fam, "all", [1])]
    assert names and all(".1." in n for n in names)
    assert not select_parameters(student, fam, "all", [7])


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = DistillConfig(steps=100, lr=1.0, warmup=0.1, min_lr=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] > 0.1 and lrs[-1] < 0.11


def test_data_order_is_a_permutation_per_epoch_and_depends_on_the_seed():
    order = [micro_order(k, 5, 0) for k in range(10)]
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:]) == list(range(5))
    assert order[:5] != order[5:] or [micro_order(k, 5, 1) for k in range(5)] != order[:5]
    assert order == [micro_order(k, 5, 0) for k in range(10)]


def test_hooks_see_every_step_in_order():
    teacher = build_tiny("vit")
    student = copy.deepcopy(teacher)
    seen: list[tuple[str, int]] = []
    distill(
        student,
        teacher,
        toy_batches("vit", 2, 0),
        DistillConfig(steps=3, lr=1e-3),
        PassContext(family=FAMILIES["vit"]),
        before_step=lambda s, m: seen.append(("before", s)),
        after_step=lambda s, m: seen.append(("after", s)),
    )
    assert seen == [(w, s) for s in range(3) for w in ("before", "after")]


def test_an_ensemble_teacher_is_a_callable():
    fam = FAMILIES["gpt2"]
    a, b = build_tiny("gpt2", seed=0), build_tiny("gpt2", seed=1)
    student = copy.deepcopy(a)

    def ensemble(batch, need_hidden, need_layers):
        ta, tb = model_targets(a, fam, batch), model_targets(b, fam, batch)
        ta.output = (ta.output + tb.output) / 2
        return ta

    res = distill(
        student, ensemble, toy_batches("gpt2", 3, 0), DistillConfig(steps=6, lr=3e-3), PassContext(family=fam)
    )
    assert res.loss_last < res.loss_first


def test_soft_kl_gradient_is_the_closed_form():
    s = torch.randn(3, 7, requires_grad=True)
    t = torch.randn(3, 7)
    soft_kl(s, t, 2.0).sum().backward()
    ref = s.detach().clone().requires_grad_(True)
    lt, ls = (t / 2).log_softmax(-1), (ref / 2).log_softmax(-1)
    ((lt.exp() * (lt - ls)).sum(-1) * 4).sum().backward()
    torch.testing.assert_close(s.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_averages_micro_batches():
    fam = FAMILIES["bert"]
    teacher = build_tiny("bert")
    base = copy.deepcopy(teacher)
    fam.remove_layers(base, [1])
    data = toy_batches("bert", 4, 0)
    one, two = copy.deepcopy(base), copy.deepcopy(base)
    r1 = distill(
        one, teacher, data, DistillConfig(steps=1, lr=1e-3, accumulate=2, grad_clip=None), PassContext(family=fam)
    )
    r2 = distill(
        two, teacher, data, DistillConfig(steps=1, lr=1e-3, accumulate=1, grad_clip=None), PassContext(family=fam)
    )
    assert r1.loss_first != r2.loss_first  # two micro-batches were averaged, not one
    assert not same_state(state(one), state(two))


class Killed(Exception):
    pass


def test_kill_and_resume_reproduces_the_uninterrupted_weights(tmp_path):
    fam = FAMILIES["llama"]
    teacher = build_tiny("llama")
    base = copy.deepcopy(teacher)
    fam.remove_layers(base, [2])
    data = toy_batches("llama", 3, 0)
    cfg = DistillConfig(steps=7, lr=3e-3, layers_weight=1.0, save_every=2, accumulate=2)
    straight = copy.deepcopy(base)
    distill(straight, teacher, data, cfg, PassContext(family=fam), layer_map=[0, 1, 3])

    def kill(step, model):
        if step == 4:  # after the state of step 4 was saved, before the one of step 6
            raise Killed

    first = copy.deepcopy(base)
    with pytest.raises(Killed):
        distill(
            first, teacher, data, cfg, PassContext(family=fam), layer_map=[0, 1, 3], after_step=kill, workdir=tmp_path
        )
    assert (tmp_path / "distill_state.pt").is_file()
    resumed = copy.deepcopy(base)  # a new process starts again from the input checkpoint
    res = distill(resumed, teacher, data, cfg, PassContext(family=fam), layer_map=[0, 1, 3], workdir=tmp_path)
    assert res.resumed_from == 4
    assert same_state(state(straight), state(resumed))
    assert not (tmp_path / "distill_state.pt").exists()


def test_more_than_three_epochs_is_warned_about():
    teacher = build_tiny("vit")
    ctx = PassContext(family=FAMILIES["vit"])
    distill(copy.deepcopy(teacher), teacher, toy_batches("vit", 1, 0), DistillConfig(steps=4), ctx)
    assert any("passes over 1 training batches" in w for w in ctx.warnings)
