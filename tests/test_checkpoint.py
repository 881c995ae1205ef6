"""Checkpoints: bit-exact round trips, tied weights, manifest replay, and every bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import MINILM
from tiny import build_tiny, make_tiny

import squeeze.compress as ck  # load = run.load (replays squeeze folders), save = checkpoint.save
from squeeze.cli.main import main
from squeeze.compress.checkpoint import SHARD_INDEX
from squeeze.compress.errors import SqueezeError
from squeeze.compress.evaluate import model_outputs
from squeeze.compress.passes import REGISTRY, Edit, Pass, PassConfig, PassContext, run_pass


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _inputs(ckpt):
    ctx = PassContext(family=ckpt.family, checkpoint=ckpt)
    return ctx.eval_batches()[0]


def test_round_trip_bit_exact(tiny, tmp_path):
    name, folder = tiny
    a = ck.load(folder)
    ck.save(a, tmp_path / "out")
    b = ck.load(tmp_path / "out")
    assert _same_state(a.model, b.model)
    batch = _inputs(a)
    out_a, out_b = model_outputs(a.model, a.family, batch), model_outputs(b.model, b.family, batch)
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    manifest = json.loads((tmp_path / "out" / "squeeze.json").read_text())
    assert manifest["base"]["model_type"] == name and len(manifest["base"]["sha256"]) == 64
    if name != "vit":  # tokenizer files travel with the weights
        assert (tmp_path / "out" / "tokenizer.json").exists()


def test_round_trip_minilm(tmp_path):
    a = ck.load(MINILM)
    ck.save(a, tmp_path / "m")
    b = ck.load(tmp_path / "m")
    assert _same_state(a.model, b.model)
    assert (tmp_path / "m" / "1_Pooling" / "config.json").exists()
    assert b.tokenizer() is not None
    # the written folder is still a plain Hugging Face folder
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(str(tmp_path / "m"))
    assert _same_state(a.model, plain)


def test_gpt2_tied_weights_survive(tiny_dirs, tmp_path):
    a = ck.load(tiny_dirs["gpt2"])
    fam = a.family
    assert fam.head_module(a.model).weight.data_ptr() == fam.embedding_modules(a.model)[0].weight.data_ptr()
    ck.save(a, tmp_path / "g")
    b = ck.load(tmp_path / "g")
    assert fam.head_module(b.model).weight.data_ptr() == fam.embedding_modules(b.model)[0].weight.data_ptr()
    assert _same_state(a.model, b.model)


def test_sharded_safetensors(tmp_path):
    model = build_tiny("llama")
    model.save_pretrained(str(tmp_path / "sh"), max_shard_size="100KB")
    assert (tmp_path / "sh" / SHARD_INDEX).exists()
    loaded = ck.load(tmp_path / "sh")
    assert _same_state(model, loaded.model)


def test_pickle_refused_then_trusted(tmp_path):
    model = build_tiny("bert")
    folder = tmp_path / "pk"
    model.save_pretrained(str(folder), safe_serialization=False) if _can_save_pickle() else None
    if not (folder / "pytorch_model.bin").exists():
        folder.mkdir(exist_ok=True)
        model.config.save_pretrained(str(folder))
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(SqueezeError, match="--trust-pickle"):
        ck.load(folder)
    assert main(["inspect", str(folder)]) == 2
    loaded = ck.load(folder, trust_pickle=True)
    assert _same_state(model, loaded.model)


def _can_save_pickle() -> bool:
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


# ---------------------------------------------------------------- a manifest edit round-trips


class _ScaleConfig(PassConfig):
    factor: float = 2.0


class _AddBufferPass(Pass):
    """Test-only pass that changes structure (adds a buffer) so replay is really exercised."""

    name = "test_buffer"
    Config = _ScaleConfig

    def apply(self, models, ctx):
        model = models[0]
        self.restructure(model, None, ctx.family)
        with torch.no_grad():
            model.squeeze_test_scale.fill_(self.config.factor)
        ctx.result["buffer"] = "squeeze_test_scale"
        return model

    def restructure(self, model, edit, family):
        model.register_buffer("squeeze_test_scale", torch.zeros(3))
        return model


def test_manifest_edit_round_trips(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "test_buffer", _AddBufferPass)
    base = ck.load(tiny_dirs["bert"])
    ctx = PassContext(family=base.family)
    out = run_pass(_AddBufferPass(factor=3.0), [base], ctx)
    ck.save(out, tmp_path / "e")
    manifest = json.loads((tmp_path / "e" / "squeeze.json").read_text())
    assert manifest["edits"] == [
        {"pass": "test_buffer", "config": {"factor": 3.0}, "result": {"buffer": "squeeze_test_scale"}}
    ]
    ledger = manifest["ledger"][0]
    assert ledger["name"] == "test_buffer" and ledger["fidelity"]["cos_mean"] == pytest.approx(1.0)
    back = ck.load(tmp_path / "e")
    assert torch.equal(back.model.squeeze_test_scale, torch.full((3,), 3.0))
    assert Edit.model_validate(back.manifest.edits[0]).config == {"factor": 3.0}
    assert _same_state(out.model, back.model)
    # a state dict that does not match the manifest is refused, never silently re-initialised
    manifest["edits"] = []
    (tmp_path / "e" / "squeeze.json").write_text(json.dumps(manifest))
    with pytest.raises(SqueezeError, match="do not match the manifest"):
        ck.load(tmp_path / "e")


# ---------------------------------------------------------------- bad input: one line, exit 2


def _listing(path):
    return sorted(p.name for p in path.iterdir())


def test_missing_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such folder" in err and len(err.splitlines()) == 1


def test_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_truncated_safetensors(tiny_dirs, tmp_path, capsys):
    folder = tmp_path / "trunc"
    shutil.copytree(tiny_dirs["bert"], folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert main(["export", str(folder), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_unknown_model_type(tiny_dirs, tmp_path, capsys):
    folder = tmp_path / "unk"
    shutil.copytree(tiny_dirs["bert"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "unsupported model_type 'mamba'" in err and "bert" in err and "llama" in err


def test_hub_id_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["inspect", "someorg/some-model"]) == 2
    assert "download it first" in capsys.readouterr().err


def test_missing_package(capsys):
    assert main(["inspect", "pkg:no_such_package_xyz/model"]) == 2
    assert "no installed Python package" in capsys.readouterr().err


def test_existing_output_needs_force(tiny_dirs, tmp_path, capsys):
    a = ck.load(tiny_dirs["gpt2"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(SqueezeError, match="--force"):
        ck.save(a, tmp_path / "taken")
    assert _listing(tmp_path / "taken") == ["keep.txt"]
    ck.save(a, tmp_path / "taken", force=True)
    assert "keep.txt" not in _listing(tmp_path / "taken")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_interrupted_save_leaves_nothing(tiny_dirs, tmp_path, monkeypatch):
    a = ck.load(tiny_dirs["bert"])

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.save(a, tmp_path / "half")
    assert list(tmp_path.iterdir()) == []


def test_input_is_never_the_output(tiny_dirs, tmp_path):
    folder = tmp_path / "self"
    shutil.copytree(tiny_dirs["bert"], folder)
    a = ck.load(folder)
    with pytest.raises(SqueezeError, match="input"):
        ck.save(a, folder, force=True)


def test_inspect_json(tiny_dirs, capsys):
    assert main(["inspect", str(tiny_dirs["llama"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "llama" and info["layers"] == 4 and info["hidden_size"] == 32 and info["heads"] == 4
    assert info["params"] > 0 and info["dtypes"] == ["float32"] and info["bytes_on_disk"] > 0


def test_make_tiny_is_deterministic(tmp_path):
    a, b = make_tiny("gpt2", tmp_path / "a"), make_tiny("gpt2", tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
