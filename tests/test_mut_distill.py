"""Behaviour tests prompted by mutation testing of the distill pass (tests/mutation/sample.py distill)."""

from __future__ import annotations

import copy

import torch
from test_distill import QUICK, pruned
from tiny import build_tiny

from squeeze.compress.distill import select_parameters
from squeeze.compress.families import FAMILIES


def test_attn_role_selects_only_the_attention_sublayers():
    # catches `trainable in ("XXattnXX", "mlp")` (attn then refused as unknown) and attn/mlp swapped
    fam = FAMILIES["bert"]
    model = copy.deepcopy(build_tiny("bert"))
    attn = [n for n, _ in select_parameters(model, fam, "attn")]
    mlp = [n for n, _ in select_parameters(model, fam, "mlp")]
    assert attn and all(".attention." in n for n in attn), attn
    assert mlp and not any(".attention." in n for n in mlp), mlp


def test_auto_data_is_wiki_spans_chat_for_encoders_and_wiki_for_decoders(monkeypatch):
    # catches `src != "AUTO"` (auto passed through as a source name) and `causal and False` (spans for decoders)
    import squeeze.compress.train_data as train_data
    from squeeze.compress.passes.base import PassContext
    from squeeze.compress.passes.distill import DistillPass

    monkeypatch.setattr(train_data, "wiki_available", lambda: True)
    auto = DistillPass(data="auto")
    for chat in (True, False):  # the chat text joins the encoders' mix where its packages are installed
        monkeypatch.setattr(train_data, "chat_available", lambda chat=chat: chat)
        want = "wiki+spans+chat" if chat else "wiki+spans"
        assert auto.data_source(PassContext(family=FAMILIES["bert"])) == want
        assert auto.data_source(PassContext(family=FAMILIES["gpt2"])) == "wiki"
    assert DistillPass(data="spans").data_source(PassContext(family=FAMILIES["gpt2"])) == "spans"


def test_resumable_state_goes_into_a_new_nested_workdir_and_loss_last_is_the_curves_last(tmp_path):
    # catches `mkdir(parents=False)` (a nested workdir that does not exist yet fails) and
    # `round(curve[-1][1], 7)` (loss_last no longer the curve's last point, which is rounded to 6)
    from squeeze.compress.distill import DistillConfig, distill
    from squeeze.compress.passes.base import PassContext

    fam = FAMILIES["vit"]
    teacher = build_tiny("vit")
    student = copy.deepcopy(teacher)
    fam.remove_layers(student, [1])
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(2, 3, 16, 16, generator=g)} for _ in range(2)]
    cfg = DistillConfig(steps=2, lr=1e-3, save_every=1)
    res = distill(student, teacher, data, cfg, PassContext(family=fam), workdir=tmp_path / "a" / "b")
    assert res.loss_last == res.loss_curve[-1][1] and res.loss_last > 0
    assert not (tmp_path / "a" / "b").exists()  # finished: the state and its empty folder are gone


def test_the_pass_hands_its_settings_to_the_engine(tiny_dirs, monkeypatch):
    """steps, temperature, lr and the manifest's layer map reach the training loop as given (a
    dropped field would silently train with the engine's defaults and the identity map)."""
    import squeeze.compress.passes.distill.pass_ as pass_mod
    from squeeze.compress.passes import run_pass
    from squeeze.compress.passes.base import PassContext
    from squeeze.compress.passes.distill import DistillPass

    seen: dict = {}
    real = pass_mod.distill

    def spy(student, teacher, data, cfg, ctx, **kw):
        seen.update(cfg=cfg, layer_map=kw.get("layer_map"))
        return real(student, teacher, data, cfg, ctx, **kw)

    monkeypatch.setattr(pass_mod, "distill", spy)
    student = pruned(tiny_dirs["bert"], blocks=(2,))
    ctx = PassContext(family=student.family, checkpoint=student)
    options = {**QUICK, "steps": 2, "temperature": 3.5, "lr": 2e-3, "warmup": 0.25}
    run_pass(DistillPass(data="builtin", **options), [student], ctx)
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.temperature, cfg.lr, cfg.warmup) == (2, 3.5, 2e-3, 0.25)
    assert seen["layer_map"] == [0, 1, 3]  # block 2 dropped: student layer 2 learns teacher layer 3
