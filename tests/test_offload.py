"""Out of core (compress/offload.py) and sharded output (compress/shards.py).

A tiny llama is written here as bf16 Hugging Face shards (transformers' own writer, several
tensors per shard, a layer split across shards). Prune and quantize run on it in memory
(``run.apply``) and out of core (``offload.apply``): the scores and every saved tensor are equal
bit for bit, the out-of-core run never holds more than one layer's weights (the stream counts
materialized layers at every onload) and reads each tensor of the source once (quantize), and the
sharded outputs reload (squeeze, and plain transformers for a plain result) to the same outputs.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from tiny import make_tiny

from squeeze.cli import main as cli_main
from squeeze.compress import offload
from squeeze.compress.calibration import DataSpec
from squeeze.compress.checkpoint import save, weight_files
from squeeze.compress.errors import SqueezeError
from squeeze.compress.run import apply, load, make_pass
from squeeze.compress.shards import SHARD_INDEX, ShardWriter, parse_size

DATA = DataSpec(source="builtin", samples=4, eval_samples=4, seq_len=16)
BATCH = {"input_ids": torch.arange(5, 17).reshape(1, 12), "attention_mask": torch.ones(1, 12, dtype=torch.long)}
SHARD = "24KB"  # ~one tiny layer (hidden 32: 45 KB in bf16 per layer is split over two shards)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny llama as bf16 shards (5 files and an index), with its tokenizer."""
    root = tmp_path_factory.mktemp("offload")
    src = make_tiny("llama", root / "plain")
    model = T.AutoModelForCausalLM.from_pretrained(src).to(torch.bfloat16)
    model.save_pretrained(root / "sharded", max_shard_size="30KB")
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, root / "sharded" / f.name)
    assert (root / "sharded" / SHARD_INDEX).exists()
    assert len(weight_files(root / "sharded")[0]) > 2
    return root / "sharded"


def tensors(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(folder)[0]:
        out.update(load_file(str(f)))
    return out


def assert_same_tensors(a, b) -> None:
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        assert torch.equal(ta[k], tb[k]), k


def logits(folder) -> torch.Tensor:
    with torch.no_grad():
        return load(folder).model(**BATCH).logits


@pytest.mark.parametrize(
    "config",
    [
        {"quantize": {"weights": "int8"}},  # smoothing search + GPTQ, dynamic activations, GQA affine
        {"prune": {"drop_attn": 2}},  # sublayers skipped: the kept tensors copied from the source
        {"prune": {"drop_blocks": 1}},  # blocks removed: layers renumbered on the way out
    ],
    ids=["quantize", "prune-attn", "prune-blocks"],
)
def test_out_of_core_equals_in_memory(sharded, tmp_path, config):
    mem = apply(str(sharded), config, data=DATA, out=tmp_path / "mem", measure_fidelity=False)
    off = offload.apply(str(sharded), config, data=DATA, out=tmp_path / "off", max_shard_size=SHARD)
    assert off.manifest.edits[-1]["result"] == mem.manifest.edits[-1]["result"]  # scores, specs, drops
    assert_same_tensors(tmp_path / "mem", tmp_path / "off")
    metrics = off.manifest.ledger[-1]["metrics"]["offload"]
    n_layers = mem.manifest.base.config["num_hidden_layers"]
    assert metrics["peak_layers"] == 1  # never two layers' weights at once
    assert metrics["layer_onloads"] == n_layers  # one walk, each layer onloaded once
    assert metrics["shards"] > 1 and (tmp_path / "off" / SHARD_INDEX).exists()
    source_bytes = sum(t.numel() * t.element_size() for t in tensors(sharded).values())
    if "quantize" in config:
        assert metrics["bytes_read"] == source_bytes  # every tensor read once, no layer twice
    assert torch.equal(logits(tmp_path / "mem"), logits(tmp_path / "off"))  # the shards reload


def test_iterative_prune_rescores_out_of_core(sharded, tmp_path):
    config = {"prune": {"drop_mlp": 2, "iterative": True}}
    mem = apply(str(sharded), config, data=DATA, out=tmp_path / "mem", measure_fidelity=False)
    off = offload.apply(str(sharded), config, data=DATA, out=tmp_path / "off")
    assert off.manifest.edits[-1]["result"]["rounds"] == mem.manifest.edits[-1]["result"]["rounds"]
    assert off.manifest.ledger[-1]["metrics"]["offload"]["layer_onloads"] == 2 * 4  # two scoring walks
    assert_same_tensors(tmp_path / "mem", tmp_path / "off")


def test_dry_run_scores_without_writing(sharded, tmp_path):
    config = {"prune": {"drop_attn": 1}}
    mem = apply(str(sharded), config, data=DATA, dry_run=True)
    off = offload.apply(str(sharded), config, data=DATA, dry_run=True)
    assert off.result["scores"] == mem.result["scores"]
    assert off.result["attention"] == mem.result["attention"]


def test_sharded_plain_result_loads_in_transformers(sharded, tmp_path):
    """A whole-block prune stays plain Hugging Face: transformers reads its shards and index."""
    offload.apply(str(sharded), {"prune": {"drop_blocks": 1}}, data=DATA, out=tmp_path / "off", max_shard_size=SHARD)
    index = json.loads((tmp_path / "off" / SHARD_INDEX).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in weight_files(tmp_path / "off")[0]}
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path / "off", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(plain(**BATCH).logits, logits(tmp_path / "off"))


def test_in_memory_save_shards_when_large(sharded, tmp_path):
    ckpt = load(sharded)
    save(ckpt, tmp_path / "one")
    assert [p.name for p in weight_files(tmp_path / "one")[0]] == ["model.safetensors"]
    save(ckpt, tmp_path / "many", max_shard_size=parse_size(SHARD))
    assert len(weight_files(tmp_path / "many")[0]) > 2
    assert_same_tensors(tmp_path / "one", tmp_path / "many")
    assert torch.equal(logits(tmp_path / "one"), logits(tmp_path / "many"))


def test_shard_writer_round_trip(tmp_path):
    state = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int8),
        "c": torch.tensor(2.5, dtype=torch.bfloat16),
        "d": torch.ones(40, dtype=torch.float16),
    }
    writer = ShardWriter(tmp_path, max_shard_size=64)
    for k, v in state.items():
        writer.add(k, v)
    files = writer.close()
    assert [f.name for f in files] == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    back = tensors(tmp_path)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items())
    assert not list(tmp_path.glob(".shard-*"))  # the data files are gone
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(300) == 300
    with pytest.raises(SqueezeError):
        parse_size("lots")


def test_when_out_of_core(sharded, monkeypatch):
    quantize = make_pass({"quantize": {"weights": "int8"}})
    monkeypatch.setattr(offload, "available_bytes", lambda: 10**12)
    assert not offload.wanted(None, sharded, quantize)
    # 8 fp32 bytes per parameter (model + the pass's copy) against 80% of what is available
    numel = sum(t.numel() for t in tensors(sharded).values())
    monkeypatch.setattr(offload, "available_bytes", lambda: int(8 * numel / 0.8) + 8)
    assert not offload.wanted(None, sharded, quantize)
    monkeypatch.setattr(offload, "available_bytes", lambda: int(8 * numel / 0.8) - 8)
    assert offload.wanted(None, sharded, quantize)
    assert not offload.wanted(False, sharded, quantize)
    other = make_pass({"reparam": {}})
    assert not offload.wanted(None, sharded, other)  # cannot: stays in memory
    with pytest.raises(SqueezeError, match="does not run out of core"):
        offload.wanted(True, sharded, other)


def test_cli_offload_and_shard_size(sharded, tmp_path, capsys):
    args = ["--samples", "4", "--seq-len", "16", "--max-shard-size", SHARD, "--json"]
    code = cli_main.main(["quantize", str(sharded), "-o", str(tmp_path / "q"), "--offload", *args])
    report = json.loads(capsys.readouterr().out)["report"]
    assert code == 0 and report["metrics"]["offload"]["peak_layers"] == 1
    assert len(weight_files(tmp_path / "q")[0]) > 1
    code = cli_main.main(["prune", str(sharded), "--drop-attn", "1", "-o", str(tmp_path / "p"), "--no-offload", *args])
    report = json.loads(capsys.readouterr().out)["report"]
    assert code == 0 and "offload" not in report["metrics"] and report["fidelity"]  # in memory, measured
    assert len(weight_files(tmp_path / "p")[0]) > 1  # and still sharded


def test_tied_head_and_single_file(tmp_path):
    """GPT-2: the LM head is tied to the token embeddings (the file holds one name of the two),
    Conv1D linears and a fused qkv; one model.safetensors in."""
    src = make_tiny("gpt2", tmp_path / "gpt2")
    config = {"quantize": {"weights": "int8"}}
    mem = apply(str(src), config, data=DATA, out=tmp_path / "mem", measure_fidelity=False)
    off = offload.apply(str(src), config, data=DATA, out=tmp_path / "off", max_shard_size=SHARD)
    assert off.manifest.edits[-1]["result"] == mem.manifest.edits[-1]["result"]
    assert_same_tensors(tmp_path / "mem", tmp_path / "off")
    assert off.manifest.ledger[-1]["metrics"]["offload"]["peak_layers"] == 1
