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


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_bf16_autocast_keeps_the_identity_exact_and_still_heals(name):
    fam = FAMILIES[name]
    teacher = build_tiny(name)
    same = copy.deepcopy(teacher)
    before = state(same)
    cfg = DistillConfig(steps=2, lr=1e-2, layers_weight=1.0, precision="bf16")
    res = distill(same, teacher, toy_batches(name, 2, 0), cfg, PassContext(family=fam))
    assert res.loss_last == 0.0 and same_state(before, state(same)) and res.trained.endswith("(bf16 autocast)")

    student = copy.deepcopy(teacher)
    fam.remove_layers(student, [1])
    train, held = toy_batches(name, 6, seed=1), toy_batches(name, 3, seed=2)
    runs = {}
    for precision in ("fp32", "bf16"):
        s = copy.deepcopy(student)
        cfg = DistillConfig(steps=12, lr=1e-3, layers_weight=1.0, precision=precision)
        distill(s, teacher, train, cfg, PassContext(family=fam), layer_map=[0, 2, 3])
        assert all(p.dtype == torch.float32 for p in s.parameters())  # fp32 master weights either way
        runs[precision] = s
    assert held_apart_error(runs["bf16"], teacher, name, held) < held_apart_error(student, teacher, name, held)
    # the forwards really ran in bf16: the trained weights differ from the fp32 run's
    assert not same_state(state(runs["bf16"]), state(runs["fp32"]))


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


# --------------------------------------------------------------------------------------------
# The pass, the CLI and recipes
# --------------------------------------------------------------------------------------------

import squeeze.compress as ck  # noqa: E402  (load = run.load: replays squeeze folders)
from squeeze.cli.main import main  # noqa: E402
from squeeze.compress.chat import CHAT_PROVENANCE  # noqa: E402
from squeeze.compress.evaluate import model_outputs  # noqa: E402
from squeeze.compress.passes import run_pass  # noqa: E402
from squeeze.compress.passes.distill import DistillPass, layer_map_from_edits  # noqa: E402
from squeeze.compress.passes.prune import PrunePass  # noqa: E402

QUICK = {"steps": 3, "samples": 32, "seq_len": 16, "batch_size": 8, "lr": 1e-3, "save_every": 0}


def pruned(folder, blocks=(1,)):
    src = ck.load(folder)
    ctx = PassContext(family=src.family, checkpoint=src)
    return run_pass(PrunePass(block_layers=list(blocks)), [src], ctx, measure_fidelity=False)


def test_layer_map_composes_the_prune_edits_beyond_the_teachers():
    e1 = {"pass": "prune", "config": {}, "result": {"blocks": [1]}}
    e2 = {"pass": "prune", "config": {}, "result": {"blocks": [0, 2]}}
    q = {"pass": "quantize", "config": {}, "result": {}}
    assert layer_map_from_edits([e1], [], 4) == [0, 2, 3]
    assert layer_map_from_edits([e1, q, e2], [], 6) == [2, 4, 5]
    assert layer_map_from_edits([e1, e2], [e1], 3) == [1]  # the teacher already lost block 1
    assert layer_map_from_edits([e2], [e1], 3) is None  # not the teacher's descendant


@pytest.mark.parametrize("name", ENGINE_FAMILIES)
def test_pass_heals_every_family_and_reloads_exactly(name, tiny_dirs, tmp_path):
    student = pruned(tiny_dirs[name])
    data = {"vit": "synthetic", "bert": "builtin+chat"}.get(name, "builtin")
    ctx = PassContext(family=student.family, checkpoint=student)
    new = run_pass(DistillPass(data=data, **QUICK), [student], ctx)
    res = new.manifest.edits[-1]["result"]
    assert res["layer_map"] == [0, 2, 3] and res["loss_last"] < res["loss_first"]
    assert res["data_provenance"] == ([CHAT_PROVENANCE] if name == "bert" else [])  # packaged text: named
    fid = new.manifest.ledger[-1]["metrics"]["teacher_fidelity"]
    assert fid["after"]["cos_mean"] > fid["before"]["cos_mean"]
    ck.save(new, tmp_path / "out")
    again = ck.load(tmp_path / "out")
    batch = toy_batches(name, 1, 5)[0]
    for k, v in model_outputs(new.model, new.family, batch).items():
        assert torch.equal(v, model_outputs(again.model, again.family, batch)[k])


def test_quantized_student_trains_scales_not_codes(tiny_dirs, tmp_path):
    from squeeze.compress.passes.quantize import QuantizePass

    src = ck.load(tiny_dirs["bert"])
    q = run_pass(QuantizePass(), [src], PassContext(family=src.family, checkpoint=src), measure_fidelity=False)
    before = state(q.model)
    q.model.config._name_or_path = ""
    new = run_pass(
        DistillPass(data="builtin", trainable="scales", loss="output", **QUICK),
        [q],
        PassContext(family=q.family, checkpoint=q),
        measure_fidelity=False,
    )
    after = state(new.model)
    assert new.manifest.edits[-1]["result"]["quantized_linears"] > 0
    codes = [k for k in before if k.endswith("qweight")]
    scales = [k for k in before if k.endswith("w_scale")]
    assert codes and all(torch.equal(before[k], after[k]) for k in codes)
    assert any(not torch.equal(before[k], after[k]) for k in scales)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith("w_scale"))
    ck.save(new, tmp_path / "q")
    again = ck.load(tmp_path / "q")
    batch = toy_batches("bert", 1, 5)[0]
    torch.testing.assert_close(
        model_outputs(again.model, again.family, batch)["last_hidden_state"],
        model_outputs(new.model, new.family, batch)["last_hidden_state"],
        rtol=0,
        atol=0,
    )


def test_cli_distill_writes_a_healed_checkpoint(tiny_dirs, tmp_path, capsys):
    assert main(["prune", str(tiny_dirs["gpt2"]), "--block-layers", "2", "-o", str(tmp_path / "p")]) == 0
    out = tmp_path / "d"
    args = [
        "distill",
        str(tmp_path / "p"),
        "-o",
        str(out),
        "--data",
        "builtin",
        "--steps",
        "3",
        "--samples",
        "16",
        "--seq-len",
        "16",
        "--json",
    ]
    capsys.readouterr()
    assert main(args) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["result"]["teacher"] == str(tiny_dirs["gpt2"]) and data["result"]["layer_map"] == [0, 1, 3]
    assert ck.load(out).manifest.edits[-1]["pass"] == "distill"


def _other_vocab(tmp_path):
    from tiny import make_tiny

    return make_tiny("bert", tmp_path / "bert-v", vocab_size=400)


@pytest.mark.parametrize(
    "case, message",
    [
        (["--teacher", "{gpt2}"], "is a gpt2 model, the student a bert model"),
        (["--teacher", "{other_vocab}"], "has a vocabulary of 400 tokens, the student 384"),
        (["--steps", "0"], "--steps: Input should be greater than or equal to 1"),
        (["--lr", "-0.1"], "--lr: Input should be greater than 0"),
        (["--data", "{empty}"], "no samples (empty file)"),
        (["--data", "{missing}"], "no such file or folder"),
        (["--loss", "nope"], "--loss:"),
        (["--precision", "fp16"], "--precision:"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_dirs, tmp_path, capsys, case, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    subs = {"{gpt2}": str(tiny_dirs["gpt2"]), "{empty}": str(empty), "{missing}": str(tmp_path / "nope.txt")}
    if "{other_vocab}" in case:
        subs["{other_vocab}"] = str(_other_vocab(tmp_path))
    args = [subs.get(a, a) for a in case]
    out = tmp_path / "out"
    assert main(["distill", str(tiny_dirs["bert"]), "-o", str(out), "--data", "builtin", "--steps", "2", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err.replace("\n", " ") and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("out*"))


def test_recipe_step_distills_from_the_jobs_original(tiny_dirs, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\njobs:\n  - name: heal\n    calibration: {source: builtin, samples: 16, seq_len: 16}\n    model: "
        + str(tiny_dirs["llama"])
        + "\n    steps:\n"
        "      - prune: {block_layers: [1]}\n"
        "      - distill: {steps: 3, data: builtin, samples: 16, seq_len: 16, lr: 0.001}\n"
    )
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 0
    folders = [p for p in (tmp_path / "out").rglob("squeeze.json")]
    edits = [e for p in folders for e in __import__("json").loads(p.read_text())["edits"] if e["pass"] == "distill"]
    assert edits and edits[0]["result"]["teacher"] == str(tiny_dirs["llama"])
    assert edits[0]["result"]["layer_map"] == [0, 2, 3]


def test_recipe_step_takes_bf16_precision(tiny_dirs, tmp_path):
    import json

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\njobs:\n  - name: heal\n    calibration: {source: builtin, samples: 16, seq_len: 16}\n    model: "
        + str(tiny_dirs["llama"])
        + "\n    steps:\n"
        "      - prune: {block_layers: [1]}\n"
        "      - distill: {steps: 2, data: builtin, samples: 16, seq_len: 16, precision: bf16}\n"
    )
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 0
    edits = [e for p in (tmp_path / "out").rglob("squeeze.json") for e in json.loads(p.read_text())["edits"]]
    trained = [e["result"]["trained"] for e in edits if e["pass"] == "distill"]
    assert trained and all(t.endswith("(bf16 autocast)") for t in trained)


def test_a_killed_pass_resumes_from_its_workdir_to_the_same_weights(tiny_dirs, tmp_path, monkeypatch):
    import squeeze.compress.passes.distill.pass_ as pass_module

    student = pruned(tiny_dirs["bert"])
    cfg = {**QUICK, "steps": 5, "save_every": 2, "data": "builtin"}

    def run(workdir=None):
        ctx = PassContext(family=student.family, checkpoint=student)
        ctx.workdir = workdir
        return run_pass(DistillPass(**cfg), [student], ctx, measure_fidelity=False)

    straight = run()
    engine = pass_module.distill

    def killed(*args, **kw):
        def kill(step, model):
            if step == 2:
                raise Killed

        return engine(*args, **kw, after_step=kill)

    monkeypatch.setattr(pass_module, "distill", killed)
    with pytest.raises(Killed):
        run(tmp_path / "work")
    monkeypatch.setattr(pass_module, "distill", engine)
    resumed = run(tmp_path / "work")
    assert same_state(state(straight.model), state(resumed.model))
    assert not (tmp_path / "work").exists()  # finished: the state is gone


# --------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------

from squeeze.compress.train_data import TrainSpec, provenance, training_batches, word_spans  # noqa: E402


def test_training_text_never_includes_the_evaluation_split(tiny_dirs, tmp_path):
    from squeeze.compress.calibration import builtin_texts
    from squeeze.compress.train_data import _texts

    src = ck.load(tiny_dirs["bert"])
    assert not set(_texts("builtin", src, TrainSpec(), print)) & set(builtin_texts("eval"))
    f = tmp_path / "d.txt"
    f.write_text("\n".join(f"line {i}" for i in range(40)))
    texts = _texts(str(f), src, TrainSpec(eval_samples=8), print)
    assert texts == [f"line {i}" for i in range(32)]  # the last 8 lines evaluate


def test_training_batches_are_shuffled_deterministically(tiny_dirs):
    src = ck.load(tiny_dirs["bert"])
    a = training_batches(src, TrainSpec(source="builtin", samples=64, seq_len=16, batch_size=8, seed=0))
    b = training_batches(src, TrainSpec(source="builtin", samples=64, seq_len=16, batch_size=8, seed=0))
    c = training_batches(src, TrainSpec(source="builtin", samples=64, seq_len=16, batch_size=8, seed=1))
    assert len(a) == 8 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=True))


def test_provenance_names_each_package_set_once():
    from squeeze.compress.wiki import WIKI_PROVENANCE

    assert provenance("wiki+spans+chat") == [WIKI_PROVENANCE, CHAT_PROVENANCE]
    assert provenance("spans") == [WIKI_PROVENANCE] and provenance("builtin+teacher") == []


def test_word_spans_are_short_seeded_cuts():
    texts = ["one two three four five six seven eight nine ten eleven twelve thirteen fourteen"]
    spans = word_spans(texts, 20, seed=3)
    assert spans == word_spans(texts, 20, seed=3)
    assert all(3 <= len(s.split()) <= 12 and s in texts[0] for s in spans)


def test_decoders_can_train_on_text_sampled_from_the_teacher(tiny_dirs):
    src = ck.load(tiny_dirs["llama"])
    spec = TrainSpec(source="teacher", samples=16, seq_len=8, batch_size=4)
    a = training_batches(src, spec, teacher=src)
    b = training_batches(src, spec, teacher=src)
    assert a and all(x["input_ids"].shape[1] == 8 for x in a)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))


def test_decoder_blocks_tokenize_only_the_text_they_need(tiny_dirs):
    from squeeze.compress import train_data

    tok = ck.load(tiny_dirs["llama"]).tokenizer()
    calls: list[int] = []

    class Counting:  # the tokenizer, counting its calls
        eos_token = tok.eos_token

        def __call__(self, text, **kw):
            calls.append(len(text))
            return tok(text, **kw)

    texts = [f"sentence {i} of a long training text" for i in range(5 * train_data.PACK_CHUNK)]
    spec = TrainSpec(source="wiki", samples=6, seq_len=16, batch_size=4)
    got = train_data._packed(Counting(), texts, spec, lambda m: None)
    assert len(calls) == 1  # one chunk of 512 texts holds 6 x 16 tokens: the rest is never tokenized
    whole = tok(tok.eos_token.join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    assert torch.equal(torch.cat([b["input_ids"] for b in got]).flatten(), whole[: 6 * 16])
    assert [b["input_ids"].shape for b in got] == [(4, 16), (2, 16)]


def test_a_mix_takes_equal_shares_of_its_sources(tiny_dirs, tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("\n".join(f"zebra {i}" for i in range(200)))
    src = ck.load(tiny_dirs["bert"])
    spec = TrainSpec(source=f"builtin+{f}", samples=40, seq_len=16, batch_size=8)
    tok = src.tokenizer()
    texts = [tok.decode(row, skip_special_tokens=True) for b in training_batches(src, spec) for row in b["input_ids"]]
    assert len(texts) == 40 and sum("zebra" in t for t in texts) == 20


def _ledger(curve: list | None) -> dict:
    rows = [
        {"step": 0, "pass": "original", "bytes": 9e6, "fidelity": {}},
        {"step": 1, "pass": "prune", "bytes": 8e6, "fidelity": {"cos_mean": 0.95}, "metrics": {}},
        {"step": 2, "pass": "distill", "bytes": 8e6, "fidelity": {"cos_mean": 0.98}},
        {"step": 3, "pass": "export", "bytes": 8e6, "latency_ratio": 0.6, "fidelity": {"cos_mean": 0.98}},
    ]
    if curve is not None:
        rows[2]["metrics"] = {"loss_curve": curve}
    return {"format": 1, "jobs": [{"job": "edge", "status": "ok", "rows": rows}]}


def _png_width(path) -> int:
    data = path.read_bytes()
    assert data[:4] == b"\x89PNG"
    return int.from_bytes(data[16:20], "big")


def test_report_plot_draws_the_loss_curve_only_when_a_row_has_one(tmp_path):
    from squeeze.compress import report

    curve = [[1, 0.5], [2, 0.3], [3, 0.2]]
    assert report.loss_curves(_ledger(None)) == []
    assert report.loss_curves(_ledger(curve)) == [("edge: 2 distill", 0, [1.0, 2.0, 3.0], [0.5, 0.3, 0.2])]
    report.plot(_ledger(None), tmp_path / "without.png")
    report.plot(_ledger(curve), tmp_path / "with.png")
    # the curve gets its own third panel: the figure is half as wide again
    assert _png_width(tmp_path / "with.png") > 1.3 * _png_width(tmp_path / "without.png")


def test_report_markdown_names_the_reference_graphs_with_their_latency_ratio():
    from squeeze.compress import report

    ledger = _ledger(None)
    ledger["jobs"][0]["rows"][0]["params"] = 10
    for r in ledger["jobs"][0]["rows"]:
        r.setdefault("params", 10)
    base = {"bytes": 2**20, "latency_ratio": 0.45, "ratio_spread": [0.4, 0.5], "fidelity": {"cos_mean": 0.998}}
    ledger["jobs"][0]["rows"][3]["baselines"] = {"ORT dynamic int8": base}
    text = report.markdown(ledger)
    assert "ORT dynamic int8: 1.0 MB, cos 0.9980, 0.45x (0.40-0.50) vs fp32" in text
    assert "Reference graphs" not in report.markdown(_ledger(None) | {"jobs": [{**ledger["jobs"][0], "rows": []}]})


def test_a_quick_run_caps_the_training_steps_of_the_demo_recipe():
    from pathlib import Path

    from squeeze.compress.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "minilm-edge.yaml", check_refs=False)
    (edge,) = [j for j in recipe.jobs if j.name == "minilm-edge"]
    assert [s.pass_name for s in edge.steps] == ["prune", "distill", "quantize", "export"]
    assert edge.steps[1].config.steps > 8
    quick = next(j for j in recipe.with_samples(8).jobs if j.name == "minilm-edge")
    assert quick.steps[1].config.steps == 8 and quick.calibration.samples == 8
    assert quick.steps[0].config == edge.steps[0].config  # nothing else changes
