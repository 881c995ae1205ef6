"""Calibration and evaluation data: every source, disjoint splits, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from squeeze.compress import checkpoint as ck
from squeeze.compress.calibration import CALIB_LINES, DataSpec, batches, builtin_corpus, builtin_texts
from squeeze.compress.errors import SqueezeError


def test_builtin_corpus_is_large_varied_and_split_disjoint():
    lines = builtin_corpus()
    assert len(lines) >= 400 and len(set(lines)) == len(lines)
    calib, ev = builtin_texts("calib"), builtin_texts("eval")
    assert len(calib) == CALIB_LINES and len(ev) >= 100 and not set(calib) & set(ev)


def test_encoder_batches_are_padded_samples(tiny_dirs):
    c = ck.load(tiny_dirs["bert"])
    bs = batches(c, DataSpec(samples=20, batch_size=8, seq_len=32))
    assert [len(b["input_ids"]) for b in bs] == [8, 8, 4]
    assert all(b["input_ids"].shape[1] <= 32 and b["attention_mask"].shape == b["input_ids"].shape for b in bs)


def test_decoder_batches_are_packed(tiny_dirs):
    c = ck.load(tiny_dirs["gpt2"])
    bs = batches(c, DataSpec(samples=6, batch_size=4, seq_len=64))
    assert [tuple(b["input_ids"].shape) for b in bs] == [(4, 64), (2, 64)]
    assert all(bool(b["attention_mask"].all()) for b in bs)


def test_text_and_jsonl_files_split_calib_and_eval(tiny_dirs, tmp_path):
    c = ck.load(tiny_dirs["bert"])
    rows = [{"text": f"sample number {i} about topic {i % 7}", "label": i % 2} for i in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    spec = DataSpec(source=str(path), samples=100, eval_samples=10, batch_size=64)
    calib, ev = batches(c, spec)[0], batches(c, spec.for_eval(), split="eval")[0]
    assert len(calib["input_ids"]) == 30 and len(ev["input_ids"]) == 10
    assert ev["labels"].tolist() == [r["label"] for r in rows[30:]]
    txt = tmp_path / "d.txt"
    txt.write_text("\n".join(r["text"] for r in rows))
    assert len(batches(c, DataSpec(source=str(txt), samples=5))[0]["input_ids"]) == 5


def test_npz_images_for_vit(tiny_dirs, tmp_path):
    c = ck.load(tiny_dirs["vit"])
    arr = (np.random.default_rng(0).random((12, 8, 8)) * 16).astype(np.float32)
    np.savez(tmp_path / "img.npz", pixel_values=arr, labels=np.arange(12) % 3)
    b = batches(c, DataSpec(source=str(tmp_path / "img.npz"), samples=50, eval_samples=3))[0]
    assert tuple(b["pixel_values"].shape) == (9, 3, 16, 16) and b["labels"].tolist() == (np.arange(9) % 3).tolist()
    assert float(b["pixel_values"].min()) >= -1.0001 and float(b["pixel_values"].max()) <= 1.0001


def test_synthetic_is_warned_and_seeded(tiny_dirs):
    c = ck.load(tiny_dirs["llama"])
    warnings: list[str] = []
    a = batches(c, DataSpec(source="synthetic", samples=4, seq_len=16), warn=warnings.append)
    b = batches(c, DataSpec(source="synthetic", samples=4, seq_len=16), warn=warnings.append)
    assert torch.equal(a[0]["input_ids"], b[0]["input_ids"]) and warnings and "synthetic" in warnings[0]


@pytest.mark.parametrize("content, message", [("", "empty"), ("{not json", "invalid JSON"), ('{"txt": "x"}', "text")])
def test_bad_data_files(tiny_dirs, tmp_path, content, message):
    c = ck.load(tiny_dirs["bert"])
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SqueezeError, match=message):
        batches(c, DataSpec(source=str(path)))


def test_npz_for_text_model_is_refused(tiny_dirs):
    with pytest.raises(SqueezeError, match="images"):
        batches(ck.load(tiny_dirs["bert"]), DataSpec(source="x.npz"))
