"""What issue 16 fixed that is not a bad input: deterministic bytes, temp folders swept, eval of a
whole data file, the report's Pareto front, latency in a fresh interleaved process."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import squeeze.compress as ck  # load = run.load (replays squeeze folders), save = checkpoint.save
from squeeze.cli.main import main
from squeeze.compress import report
from squeeze.compress.checkpoint import atomic_dir
from squeeze.compress.errors import SqueezeError
from squeeze.compress.paths import check_output


def test_tied_weights_save_to_identical_bytes_with_one_metadata_key(tiny_dirs, tmp_path):
    gpt2 = ck.load(tiny_dirs["gpt2"])  # tied embedding / head: safetensors' save_model made a key per alias
    files = [ck.save(gpt2, tmp_path / f"o{i}") / "model.safetensors" for i in range(2)]
    assert files[0].read_bytes() == files[1].read_bytes()
    n = int.from_bytes(files[0].read_bytes()[:8], "little")
    header = json.loads(files[0].read_bytes()[8 : 8 + n])
    assert header["__metadata__"] == {"format": "pt"}  # alias keys were written in hash order
    again = ck.load(tmp_path / "o0")  # re-tied on load, checksum verified
    assert again.model.lm_head.weight.data_ptr() == again.model.transformer.wte.weight.data_ptr()


def test_stale_temp_of_a_dead_process_is_swept(tiny_dirs, tmp_path):
    stale = tmp_path / ".out.tmp-999999999"
    stale.mkdir()
    (stale / "step.json").write_text("{}")
    ck.save(ck.load(tiny_dirs["bert"]), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_completion_marks_are_not_copied_and_inner_links_are(tiny_dirs, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_dirs["bert"], src)
    (src / "step.json").write_text('{"key": "x"}')
    (src / "extra.txt").write_text("kept")
    (src / "alias.txt").symlink_to("extra.txt")
    out = ck.save(ck.load(src), tmp_path / "out")
    assert not (out / "step.json").exists()
    assert (out / "alias.txt").read_text() == "kept" and not (out / "alias.txt").is_symlink()


def test_output_rules(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert check_output("new", ["model"]) == tmp_path / "new"
    assert check_output("model/m.onnx", ["model"], kind="file") == tmp_path / "model/m.onnx"  # a file beside it
    for out, words in (("model", "overwrite the input"), (".", "holds the input"), ("model/x", "inside the input")):
        with pytest.raises(SqueezeError, match=words):
            check_output(out, ["model"], force=True)


def test_eval_reads_every_row_of_a_data_file(tiny_dirs, tmp_path, capsys):
    rows = [{"text": f"sample number {i} of the labelled file", "label": i % 2} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    bert = str(tiny_dirs["bert"])
    assert main(["eval", bert, "--ref", bert, "--data", str(tmp_path / "d.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 40  # was 10: the last quarter only
    assert result["cos_mean"] == pytest.approx(1.0)


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.9), (1.5, 0.4), (3.0, 0.95), (2.5, 0.8), (1.0, 0.45)]
    assert report.pareto(pts) == [0, 1, 3]


def test_plot_with_baselines(tmp_path):
    def row(step, name, size, lat, cos):
        return {
            "step": step,
            "pass": name,
            "params": 10,
            "bytes": size,
            "latency_ms": lat,
            "fidelity": {} if step == 0 else {"cos_mean": cos},
        }

    data = {
        "format": 1,
        "jobs": [
            {
                "job": "fp32",
                "status": "ok",
                "rows": [row(0, "original", 90e6, None, 1), row(1, "export", 90e6, 8.0, 1.0)],
            },
            {
                "job": "int8",
                "status": "ok",
                "rows": [
                    row(0, "original", 90e6, None, 1),
                    row(1, "quantize", 25e6, None, 0.99),
                    row(2, "export", 25e6, 4.0, 0.99),
                ],
            },
        ],
        "baselines": {"ORT dynamic int8": {"bytes": 23e6, "latency_ms": 4.5, "cos_mean": 0.985}},
    }
    names = [n for n, _ in report._baselines(data)]
    assert names == ["fp32 (original)", "ORT dynamic int8", "fp32 ONNX"]
    report.plot(data, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_latency_in_a_fresh_process_against_a_reference(tiny_dirs, tmp_path):
    from squeeze.compress.export import export_onnx
    from squeeze.compress.latency import measure

    bert = ck.load(tiny_dirs["bert"])
    rep = export_onnx(bert, tmp_path / "m.onnx", latency=False)
    assert rep["model"] == "m.onnx"  # no temp or host path in the report
    feeds = {"input_ids": [[2, 40, 41, 3]], "attention_mask": [[1, 1, 1, 1]], "token_type_ids": [[0, 0, 0, 0]]}
    res = measure(tmp_path / "m.onnx", feeds, reference=tmp_path / "m.onnx", rounds=5, runs=3)
    assert res["latency_ms"] > 0 and res["reference_ms"] > 0
    lo, hi = res["ratio_spread"]
    assert lo <= res["latency_ratio"] <= hi
    assert 0.5 < res["latency_ratio"] < 2.0  # the same graph against itself (measured 0.93-1.07 here)


def test_run_folder_rules_and_lock(tmp_path):
    from squeeze.compress.paths import check_run_output, locked, mark_run_output

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.md").write_text("mine")
    with pytest.raises(SqueezeError, match="did not write"):
        check_run_output(user)
    assert check_run_output(user, force=True) == user
    (tmp_path / "model").mkdir()
    with pytest.raises(SqueezeError, match="inside the input"):
        check_run_output(tmp_path / "model" / "out", [tmp_path / "model"])
    new = check_run_output(tmp_path / "new")
    mark_run_output(new)
    (new / "report.json").write_text("{}")
    assert check_run_output(new) == new  # squeeze's own folder: a rerun needs no --force
    with locked(new):
        with pytest.raises(SqueezeError, match="in use by another squeeze run"), locked(new):
            pass
    with locked(new):  # released
        pass


def test_job_baselines_fp32_and_ort_dynamic(tiny_dirs, tmp_path):
    from squeeze.compress.baselines import job_baselines
    from squeeze.compress.calibration import DataSpec, batches
    from squeeze.compress.evaluate import reference_outputs

    bert = ck.load(tiny_dirs["bert"])
    spec = DataSpec(samples=4, seq_len=16, eval_samples=4)
    ref = reference_outputs(bert.model, bert.family, batches(bert, spec.for_eval(), split="eval"))
    feeds = {"input_ids": [[2, 40, 41, 3]], "attention_mask": [[1, 1, 1, 1]], "token_type_ids": [[0, 0, 0, 0]]}
    rows = job_baselines(bert, ref, tmp_path / "b", "key1", feeds, spec)
    fp32, dyn = rows["fp32 ONNX"], rows["ORT dynamic int8"]
    assert fp32["fidelity"]["cos_mean"] > 0.99999 and fp32["latency_ratio"] == 1.0
    assert dyn["bytes"] < fp32["bytes"] and 0.9 < dyn["fidelity"]["cos_mean"] < 1.0
    lo, hi = dyn["ratio_spread"]
    assert lo <= dyn["latency_ratio"] <= hi
    assert job_baselines(bert, ref, tmp_path / "b", "key1", feeds, spec) == rows  # reused, not re-measured


def test_sigterm_during_a_write_removes_the_temporary_folder(tmp_path):
    import signal
    import time

    pid = os.fork()
    if pid == 0:  # the child: SIGTERM itself in the middle of a checkpoint write
        code = 1
        # as in a fresh `squeeze` process: pytest-xdist's worker has a SIGTERM handler of its own
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            with atomic_dir(tmp_path / "out") as tmp:
                (tmp / "model.safetensors").write_bytes(b"half")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
        except KeyboardInterrupt:
            code = 130
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130
    assert list(tmp_path.iterdir()) == []


def test_ledger_and_plot_use_the_latency_ratio(tmp_path):
    base = {
        "fp32 ONNX": {"bytes": 90e6, "latency_ms": 8.0, "latency_ratio": 1.0, "fidelity": {"cos_mean": 1.0}},
        "ORT dynamic int8": {
            "bytes": 23e6,
            "latency_ms": 4.4,
            "latency_ratio": 0.55,
            "ratio_spread": [0.5, 0.6],
            "fidelity": {"cos_mean": 0.985},
        },
    }
    rows = [
        {"step": 0, "pass": "original", "params": 10, "bytes": 90e6, "fidelity": {}},
        {"step": 1, "pass": "quantize", "params": 10, "bytes": 25e6, "fidelity": {"cos_mean": 0.99}},
        {
            "step": 2,
            "pass": "export",
            "params": 10,
            "bytes": 25e6,
            "latency_ms": 4.0,
            "latency_ratio": 0.5,
            "ratio_spread": [0.45, 0.55],
            "fidelity": {"cos_mean": 0.99},
            "baselines": base,
        },
    ]
    data = {"format": 1, "jobs": [{"job": "int8", "status": "ok", "rows": rows}]}
    cols, cells = report.ledger_table(data)
    assert cells[2][cols.index("vs fp32")] == "0.50x (0.45-0.55)" and cells[0][cols.index("vs fp32")] == "-"
    assert [n for n, _ in report._baselines(data)] == ["fp32 (original)", "fp32 ONNX", "ORT dynamic int8"]
    report.plot(data, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_run_with_force_keeps_a_users_folders_and_ignores_hidden_temporaries(tiny_dirs, tmp_path, monkeypatch):
    from squeeze.compress import pipeline

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dirs["bert"], tmp_path / "model")
    (tmp_path / "r.yaml").write_text("jobs:\n  - name: a\n    model: model\n    steps: [{prune: {attn_layers: [1]}}]\n")
    (tmp_path / "tb/a/07-old").mkdir(parents=True)
    (tmp_path / "tb/a/07-old/notes.txt").write_text("mine")  # named like a step, not squeeze's
    (tmp_path / "tb/notes.md").write_text("mine")
    assert main(["run", "r.yaml", "-o", "tb", "--force"]) == 0
    assert (tmp_path / "tb/a/07-old/notes.txt").read_text() == "mine" and (tmp_path / "tb/notes.md").exists()
    assert main(["run", "r.yaml", "-o", "tb"]) == 0  # squeeze's folder now: a rerun needs no --force
    # a killed save's hidden temporary with a completion mark (as older versions copied in) is never a cached step
    key = json.loads((tmp_path / "tb/a/01-prune/step.json").read_text())["key"]
    (tmp_path / "tb/b/.01-prune.tmp-1").mkdir(parents=True)
    (tmp_path / "tb/b/.01-prune.tmp-1/step.json").write_text(json.dumps({"key": key}))
    assert pipeline._finished_steps(tmp_path / "tb") == {key: tmp_path / "tb/a/01-prune"}


def test_plain_progress_lines_for_slow_stages_only(monkeypatch, capsys):
    from squeeze.cli import common

    clock = [0.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: clock[0])
    show = common.PlainProgress()
    show("quick", 1, 2)
    show("quick", 2, 2)  # done within 2 s: nothing
    for t, done in ((0, 0), (1, 1), (2.5, 2), (3, 3), (5, 4), (5.1, 10)):
        clock[0] = 10 + t
        show("slow", done, 10)
    assert capsys.readouterr().err.splitlines() == ["slow 2/10 (2 s)", "slow 4/10 (5 s)", "slow 10/10 (5 s)"]
