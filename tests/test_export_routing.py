"""Recipes and the Python API export what ``squeeze export`` does: a causal LM gets the KV-cache graph."""

from __future__ import annotations

import json

import onnx

from squeeze.cli.main import main
from squeeze.compress import run

CAL = "{source: builtin, samples: 4, eval_samples: 4, seq_len: 16}"
PREFILL_COS = 0.9999  # the KV-cache graph run as a prefill vs PyTorch (fp32; measured 1.0 on tiny llama)


def _inputs(path) -> list[str]:
    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def test_recipe_export_of_a_causal_lm_has_the_cache(tmp_path, tiny_dirs):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\ndefaults:\n  calibration: {CAL}\njobs:\n  - name: a\n"
        f"    model: {tiny_dirs['llama']}\n    steps:\n      - export: {{latency: false}}\n"
    )
    out = tmp_path / "out"
    assert main(["run", str(recipe), "-o", str(out)]) == 0
    assert "past_key_values.0.key" in _inputs(out / "a" / "01-export" / "model.onnx")
    row = json.loads((out / "report.json").read_text())["jobs"][0]["rows"][-1]
    assert row["pass"] == "export" and row["fidelity"]["cos_mean"] > PREFILL_COS


def test_python_export_of_a_causal_lm_has_the_cache(tmp_path, tiny_dirs):
    report = run.export(str(tiny_dirs["llama"]), tmp_path / "m.onnx", latency=False)
    assert "past_key_values.0.key" in _inputs(tmp_path / "m.onnx")
    assert report["task"] == "text-generation-with-past"
