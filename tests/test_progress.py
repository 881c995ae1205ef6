"""Progress on stderr: with stderr not a terminal (capsys), export, eval and quantize name their
stages in plain lines; a stage that calls back no more is still named (the heartbeat)."""

from __future__ import annotations

import time

import pytest

from squeeze.cli import common
from squeeze.cli.main import main


@pytest.fixture
def every_stage(monkeypatch):
    """Plain progress shows every stage at once (the real threshold is 2 s)."""
    monkeypatch.setattr(common, "PLAIN_EVERY_S", 0.0)


def test_export_and_eval_name_their_stages(tiny_dirs, tmp_path, capsys, every_stage):
    out = tmp_path / "b.onnx"
    assert main(["export", str(tiny_dirs["bert"]), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    for stage in ("tracing the model 0/4", "fusing (ONNX Runtime optimizer) 1/4", "validating with ONNX Runtime 2/4"):
        assert f"export: {stage}" in err, err
    assert main(["eval", str(out), "--ref", str(tiny_dirs["bert"]), "--samples", "4", "--seq-len", "16"]) == 0
    err = capsys.readouterr().err
    assert "eval: running the reference and the graph in ONNX Runtime on 4 samples 1/2" in err, err


def test_quantize_names_its_sub_steps(tiny_dirs, tmp_path, capsys, every_stage):
    argv = ["quantize", str(tiny_dirs["bert"]), "-o", str(tmp_path / "q"), "--samples", "8", "--seq-len", "16"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    for sub in ("capturing inputs", "attn_in: smoothing search", "mlp_out: GPTQ"):
        assert f"quantize layers: layer 2/4: {sub} 1/4" in err, err


def test_heartbeat_names_a_silent_stage_and_stops(monkeypatch, capsys):
    monkeypatch.setattr(common, "PLAIN_EVERY_S", 0.05)
    monkeypatch.setattr(common, "HEARTBEAT_S", 0.01)
    with common.PlainProgress() as show:
        show("export: tracing the model", 0, 3)  # then no call for a while
        time.sleep(0.4)
        show("export: done", 3, 3)
    time.sleep(0.1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3 and all(x.startswith("export: tracing the model 0/3 (") for x in lines[:-1]), lines
    assert lines[-1].startswith("export: done 3/3")
    time.sleep(0.1)
    assert capsys.readouterr().err == ""  # the thread is gone with the context
