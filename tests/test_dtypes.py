"""bf16 / fp16 checkpoints: load, pass through prune, quantize, merge and distill, save in their own
dtype (or ``--dtype``), reload bit-identically, and export."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from squeeze.compress import dtypes
from squeeze.compress.errors import SqueezeError
from squeeze.compress.run import apply, load

STEPS = {
    "prune": {"prune": {"drop_attn": 1}},
    "quantize": {"quantize": {"weights": "int8", "activations": "dynamic", "gptq": False}},
    "distill": {"distill": {"data": "builtin", "samples": 8, "seq_len": 16, "batch_size": 4, "steps": 2}},
}


def _half_folder(tmp: Path, name: str, dtype: torch.dtype, seed: int = 0) -> Path:
    from tiny import build_tiny, write_tokenizer

    folder = tmp / f"{name}-{dtypes.name(dtype)}-{seed}"
    if not (folder / "config.json").exists():
        build_tiny(name, seed=seed).to(dtype).save_pretrained(str(folder))
        write_tokenizer(name, folder)
    return folder


def _stored(folder: Path) -> set[str]:
    with (folder / "model.safetensors").open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def _logits(ckpt, ids):
    out = ckpt.family.forward(ckpt.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_folder_loads_as_fp32_and_remembers_its_dtype(tmp_path, dtype):
    folder = _half_folder(tmp_path, "llama", dtype)
    ck = load(folder)
    assert {p.dtype for p in ck.model.parameters()} == {torch.float32}
    assert dtypes.storage_dtype(ck.model) == dtype
    import transformers as T

    plain = T.AutoModelForCausalLM.from_pretrained(str(folder)).eval()  # bf16 / fp16 weights as stored
    for (k, a), b in zip(ck.model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b.float()), k  # the upcast is exact


@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_checkpoint_through_each_pass_saves_its_dtype_and_reloads_exactly(tmp_path, step, dtype):
    folder = _half_folder(tmp_path, "llama", dtype)
    out = tmp_path / "out"
    new = apply(folder, STEPS[step], out=out)
    st = dtypes._SAFETENSORS
    want = next(k for k, v in st.items() if v == dtype)
    assert want in _stored(out) and "F32" not in _stored(out)  # saved in its own dtype, nothing fp32
    assert json.loads((out / "config.json").read_text())["dtype"] == dtypes.name(dtype)
    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    back = load(out)
    with torch.no_grad():
        assert torch.equal(_logits(new, ids), _logits(back, ids))  # ledger measured what was saved


def test_merge_of_two_bf16_models_runs_and_reloads(tmp_path):
    a, b = (_half_folder(tmp_path, "llama", torch.bfloat16, seed=s) for s in (0, 1))
    new = apply(a, {"merge": {"others": [str(b)]}}, out=tmp_path / "m")
    back = load(tmp_path / "m")
    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(_logits(new, ids), _logits(back, ids))


def test_dtype_option_overrides_the_storage_dtype(tmp_path):
    folder = _half_folder(tmp_path, "llama", torch.bfloat16)
    apply(folder, STEPS["prune"], out=tmp_path / "f16", dtype="fp16")
    assert _stored(tmp_path / "f16") == {"F16"}
    assert dtypes.storage_dtype(load(tmp_path / "f16").model) == torch.float16
    with pytest.raises(SqueezeError, match="--dtype"):
        apply(folder, STEPS["prune"], out=tmp_path / "bad", dtype="int3")
    assert not (tmp_path / "bad").exists()


def test_rounding_is_what_saving_does():
    lin = torch.nn.Linear(8, 8)
    lin.config = type("C", (), {"dtype": torch.bfloat16})()
    before = lin.weight.detach().clone()
    dtypes.round_to_storage(lin)
    assert torch.equal(lin.weight, before.to(torch.bfloat16).float())
    assert not torch.equal(lin.weight, before)  # it did round
    saved = dtypes.state_for_saving(lin, lin.state_dict())
    assert saved["weight"].dtype == torch.bfloat16 and torch.equal(saved["weight"].float(), lin.weight)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_bf16_quantized_model_exports(tmp_path, name):
    from squeeze.compress.export import export_onnx

    folder = _half_folder(tmp_path, name, torch.bfloat16)
    q = apply(folder, STEPS["quantize"], out=tmp_path / "q")
    report = export_onnx(load(tmp_path / "q"), tmp_path / "q.onnx", latency=False)
    assert (tmp_path / "q.onnx").exists() and report["validation"]
    assert all(check.get("ok", True) for check in report["validation"])
    assert dtypes.storage_dtype(q.model) == torch.bfloat16


_TRAIN = ["--samples", "8", "--seq-len", "16"]
#: every command that writes a checkpoint, with the cheapest arguments that run it on a tiny llama
CLI_WRITERS = {
    "prune": ["--drop-blocks", "1", "--samples", "8"],
    "merge": ["{other}"],
    "fuse": ["{other}", "--samples", "8", "--seq-len", "16"],
    "distill": ["--data", "builtin", "--steps", "1", "--batch-size", "4", "--samples", "8", "--seq-len", "16"],
    "factorize": ["--ratio", "0.5", "--iters", "1"],
    "reparam": ["--steps", "1", "--data", "builtin", *_TRAIN],
}


@pytest.mark.parametrize("command", sorted(CLI_WRITERS))
def test_every_checkpoint_command_saves_the_input_dtype_or_dtype(tmp_path, command):
    """A bf16 llama stays bf16 through each command; ``--dtype fp32`` saves float32."""
    from squeeze.cli.main import main

    src = _half_folder(tmp_path, "llama", torch.bfloat16)
    other = str(_half_folder(tmp_path, "llama", torch.bfloat16, seed=1))
    args = [a.format(other=other) for a in CLI_WRITERS[command]]
    runs = [("fp32", {"F32"})] + ([(None, {"BF16"})] if command in ("prune", "distill") else [])
    for dtype, want in runs:
        out = tmp_path / f"{command}-{dtype}"
        assert main([command, str(src), *args, "-o", str(out), *(["--dtype", dtype] if dtype else [])]) == 0
        floats = _stored(out) - {"I8", "U8", "I16", "I32", "I64"}
        assert floats == want, (command, dtype, floats)
        assert json.loads((out / "config.json").read_text())["dtype"] == ("float32" if dtype else "bfloat16")
