"""compressed-tensors: squeeze writes it, plain transformers loads it with squeeze's own outputs,
squeeze reads it back (its own folders exactly, any other one de-quantized)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny import make_tiny

from squeeze.compress import formats_ct, formats_ct_read
from squeeze.compress.errors import SqueezeError
from squeeze.compress.run import apply, load

pytest.importorskip("compressed_tensors")  # transformers' loader for the format (the dev extra installs it)

# transformers (compressed-tensors' CompressedLinear, dequantized weights) against squeeze's twin:
# the same codes and scales; weight-only measured 0.0, dynamic int8 activations (the same
# DynamicQuantizeLinear range rule, a folded smoothing scale) 2.1e-7 on the tiny llama's logits.
CT_ATOL = 1e-5

CT = "compressed-tensors"


@pytest.fixture(scope="module")
def mha_llama(tmp_path_factory):
    """A tiny llama without grouped-query attention (dynamic smoothing needs every scale foldable)."""
    return make_tiny("llama", tmp_path_factory.mktemp("ct") / "llama", num_key_value_heads=4)


def _ids():
    return torch.randint(5, 300, (2, 10), generator=torch.Generator().manual_seed(0))


def _plain_logits(folder):
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    foreign = {type(m).__module__.split(".")[0] for m in model.modules()} - {
        "transformers",
        "torch",
        "compressed_tensors",
    }
    assert foreign == set()  # nothing of squeeze's: loads where squeeze is not installed
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _logits(ckpt):
    with torch.no_grad():
        return ckpt.model(input_ids=_ids()).logits


@pytest.mark.parametrize(
    ("step", "stored"),
    [
        ({"weights": "int8", "activations": "none"}, torch.int8),
        ({"weights": "int4", "activations": "none", "method": "bct", "block_size": 16}, torch.int8),
        ({"weights": "int8", "activations": "dynamic"}, torch.int8),
    ],
    ids=["w8-channel", "w4-group", "w8a8-dynamic"],
)
def test_round_trip_transformers_loads_squeezes_outputs_and_squeeze_reads_it_back(tmp_path, mha_llama, step, stored):
    out = tmp_path / "ct"
    twin = apply(mha_llama, {"quantize": {**step, "gptq": False, "format": CT}}, out=out, data="builtin")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["quantization_config"]["quant_method"] == CT
    groups = config["quantization_config"]["config_groups"].values()
    linears = [g for g in groups if g["targets"][0].endswith("proj$")]  # the rest: the int8 embedding table
    assert {g["weights"]["num_bits"] for g in linears} == {int(step["weights"][3:])}
    if step["activations"] == "dynamic":
        assert all(g["input_activations"]["dynamic"] for g in linears)
        # a smoothing scale on the MLP output's input was folded into the up projection's rows
        assert any(getattr(m, "affine", None) is not None for m in twin.model.modules())
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == stored
    want = _logits(twin)
    torch.testing.assert_close(_plain_logits(out), want, atol=CT_ATOL, rtol=0)
    back = load(out)  # squeeze.json replays the quantize edit; the codes come from the ct tensors
    torch.testing.assert_close(_logits(back), want, atol=CT_ATOL, rtol=0)
    assert back.manifest.edits[-1]["config"]["format"] == CT
    back.manifest = back.manifest.model_copy(update={"weights_sha256": None})
    from squeeze.compress.checkpoint import save

    save(back, tmp_path / "again")  # re-saved in the same format, byte for byte the same codes
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in weights.items() if v.dtype == torch.int8)


def test_a_foreign_folder_loads_de_quantized_and_is_a_pass_input(tmp_path, mha_llama):
    out = tmp_path / "ct"
    twin = apply(mha_llama, {"quantize": {"weights": "int4", "activations": "none", "format": CT}}, out=out)
    (out / "squeeze.json").unlink()  # what another tool (llm-compressor) writes: no manifest
    floats = load(out)
    assert not any(type(m).__name__.startswith("Quant") for m in floats.model.modules())
    torch.testing.assert_close(_logits(floats), _logits(twin), atol=CT_ATOL, rtol=0)
    assert "quantization_config" not in floats.model.config.to_dict()
    pruned = apply(out, {"prune": {"drop_blocks": 1}}, out=tmp_path / "p")
    assert len(pruned.model.model.layers) == 3


def test_what_the_format_cannot_hold_is_refused_before_any_work(tmp_path, tiny_dirs, mha_llama):
    with pytest.raises((SqueezeError, ValueError), match="static"):
        apply(mha_llama, {"quantize": {"activations": "int8", "format": CT}}, out=tmp_path / "a")
    with pytest.raises((SqueezeError, ValueError), match="int6"):
        apply(mha_llama, {"quantize": {"weights": "int6", "activations": "none", "format": CT}}, out=tmp_path / "b")
    with pytest.raises(SqueezeError, match="grouped-query"):  # the tiny llama has 2 KV heads for 4
        apply(tiny_dirs["llama"], {"quantize": {"activations": "dynamic", "format": CT}}, out=tmp_path / "c")
    apply(mha_llama, {"prune": {"drop_attn": 1}}, out=tmp_path / "pruned")
    with pytest.raises(SqueezeError, match="plain architecture"):
        apply(tmp_path / "pruned", {"quantize": {"activations": "none", "format": CT}}, out=tmp_path / "d")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_cli_format_flag(tmp_path, mha_llama, capsys):
    from squeeze.cli.main import main

    args = ["quantize", str(mha_llama), "-o", str(tmp_path / "q"), "--no-gptq", "--activations", "none"]
    assert main([*args, "--format", CT, "--samples", "4"]) == 0
    assert formats_ct_read.is_folder(tmp_path / "q")
    capsys.readouterr()
    assert main([*args, "--format", "gguf", "--force"]) == 2
    assert "--format" in capsys.readouterr().err


@pytest.mark.parametrize("bits", [2, 4])
def test_packing_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits)
    signed = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, 37), generator=g, dtype=torch.int8)
    unsigned = signed.to(torch.int64) + (1 << (bits - 1))
    for dim in (0, 1):
        ours = formats_ct.pack(unsigned, bits, dim=dim)
        assert torch.equal(ours, pack_to_int32(signed, bits, packed_dim=dim))
        n = signed.shape[dim]
        assert torch.equal(formats_ct.unpack(ours, bits, n, dim=dim), unsigned)
        assert torch.equal(unpack_from_int32(ours, bits, signed.shape, packed_dim=dim), signed)


def test_a_symmetric_packed_w4a16_folder_is_read(tmp_path, mha_llama):
    """llm-compressor's usual W4A16: symmetric int4 in groups, packed (squeeze reads, never writes it)."""
    out = tmp_path / "ct"
    apply(mha_llama, {"quantize": {"weights": "int8", "activations": "none", "format": CT}}, out=out)
    (out / "squeeze.json").unlink()
    from safetensors.torch import load_file, save_file

    state = load_file(str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    name = "model.layers.1.self_attn.o_proj"
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    scale = w.reshape(32, 2, 16).abs().amax(-1) / 7
    codes = torch.clamp(torch.round(w / scale.repeat_interleave(16, 1)), -8, 7)
    del state[f"{name}.weight"]
    state[f"{name}.weight_packed"] = formats_ct.pack(codes.to(torch.int64) + 8, 4)
    state[f"{name}.weight_shape"] = torch.tensor([32, 32])
    state[f"{name}.weight_scale"] = scale
    save_file(state, str(out / "model.safetensors"))
    q = cfg["quantization_config"]
    group = {"targets": [f"re:^{name}$"], "format": "pack-quantized"}
    group["weights"] = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 16}
    q["config_groups"] = {"g4": group, **q["config_groups"]}
    q["format"] = "mixed-precision"
    (out / "config.json").write_text(json.dumps(cfg))
    got = load(out).model.get_submodule(name).weight
    torch.testing.assert_close(got, codes * scale.repeat_interleave(16, 1))
    shutil.rmtree(out)
