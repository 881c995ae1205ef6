"""``squeeze run``: cached and resumable steps, failing jobs, the ledger and its report files,
and every recipe in recipes/ run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from recipe_toys import RECIPE_FILES, ToyScale, recipe_copy, toys  # noqa: F401  (fixtures)

from squeeze.cli.main import main
from squeeze.compress import pipeline, report
from squeeze.compress.pipeline import STEP_FILE, strip_volatile
from squeeze.compress.recipe import load_recipe

CAL = "{source: builtin, samples: 4, eval_samples: 4, seq_len: 32}"
#: MiniLM recipes run on this many calibration / evaluation samples in the suite (CI time)
MINILM_SAMPLES = 8


def _recipe(tmp_path: Path, model: Path, steps: str, name: str = "r.yaml", extra_jobs: str = "") -> Path:
    path = tmp_path / name
    path.write_text(
        f"version: 1\ndefaults:\n  calibration: {CAL}\njobs:\n  - name: a\n    model: {model}\n"
        f"    steps:\n{steps}{extra_jobs}"
    )
    return path


def _rows(out: Path) -> dict[str, list[dict]]:
    return {j["job"]: j["rows"] for j in json.loads((out / "report.json").read_text())["jobs"]}


def _final_files(folder: Path) -> dict[str, object]:
    """What defines a checkpoint: weights and config bytes, the manifest without timings."""
    return {
        "model.safetensors": (folder / "model.safetensors").read_bytes(),
        "config.json": (folder / "config.json").read_bytes(),
        "squeeze.json": strip_volatile(json.loads((folder / "squeeze.json").read_text())),
    }


STEPS3 = (
    "      - toy_scale: {factor: 2.0, noise: 0.01}\n"
    "      - toy_scale: {factor: 0.5, noise: 0.02}\n"
    "      - toy_cal: {bits: 8}\n"
)


def test_resume_after_a_crash_gives_the_same_checkpoint(tmp_path, tiny_dirs, toys, monkeypatch, capsys):
    path = _recipe(tmp_path, tiny_dirs["bert"], STEPS3)
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert main(["run", str(path), "-o", str(clean)]) == 0

    real_apply = ToyScale.apply

    def crash_in_step_2(self, models, ctx):
        if self.config.factor == 0.5:
            raise RuntimeError("simulated crash in step 2")
        return real_apply(self, models, ctx)

    monkeypatch.setattr(ToyScale, "apply", crash_in_step_2)
    assert main(["run", str(path), "-o", str(crashed)]) == 1
    assert "simulated crash in step 2" in capsys.readouterr().err
    assert (crashed / "a" / "01-toy_scale" / STEP_FILE).exists()
    assert not (crashed / "a" / "02-toy_scale").exists()
    assert not list((crashed / "a").glob(".*"))  # no half-written folder left behind
    first = (crashed / "a" / "01-toy_scale" / STEP_FILE).read_bytes()

    monkeypatch.setattr(ToyScale, "apply", real_apply)
    ToyScale.calls = 0
    assert main(["run", str(path), "-o", str(crashed)]) == 0
    assert ToyScale.calls == 1  # only step 2 ran again
    assert (crashed / "a" / "01-toy_scale" / STEP_FILE).read_bytes() == first
    assert [r.get("cached") for r in _rows(crashed)["a"][1:]] == [True, False, False]
    assert _final_files(crashed / "a" / "03-toy_cal") == _final_files(clean / "a" / "03-toy_cal")


def test_changed_config_reruns_that_step_and_the_later_ones(tmp_path, tiny_dirs, toys):
    path = _recipe(tmp_path, tiny_dirs["bert"], STEPS3)
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out)]) == 0
    before = {d.name: (d / STEP_FILE).read_bytes() for d in (out / "a").iterdir() if d.is_dir()}
    path.write_text(path.read_text().replace("factor: 0.5", "factor: 0.25"))
    ToyScale.calls = 0
    assert main(["run", str(path), "-o", str(out)]) == 0
    assert ToyScale.calls == 1
    after = {d.name: (d / STEP_FILE).read_bytes() for d in (out / "a").iterdir() if d.is_dir()}
    assert after["01-toy_scale"] == before["01-toy_scale"]
    assert after["02-toy_scale"] != before["02-toy_scale"]
    assert after["03-toy_cal"] != before["03-toy_cal"]
    assert [r["cached"] for r in _rows(out)["a"][1:]] == [True, False, False]
    # --fresh ignores the cache; --dry-run shows what would run and runs nothing
    ToyScale.calls = 0
    assert main(["run", str(path), "-o", str(out), "--dry-run"]) == 0
    assert ToyScale.calls == 0
    assert main(["run", str(path), "-o", str(out), "--fresh"]) == 0
    assert ToyScale.calls == 2
    assert [r["cached"] for r in _rows(out)["a"][1:]] == [False, False, False]


def test_plan_marks_finished_steps(tmp_path, tiny_dirs, toys):
    path = _recipe(tmp_path, tiny_dirs["bert"], STEPS3)
    out = tmp_path / "out"
    recipe = load_recipe(path)
    assert [s.done for s in pipeline.plan(recipe, out)[0].steps] == [False] * 3
    pipeline.run(recipe, out)
    assert [s.done for s in pipeline.plan(recipe, out)[0].steps] == [True] * 3
    assert [s.done for s in pipeline.plan(recipe, out, fresh=True)[0].steps] == [False] * 3


def test_a_failing_job_is_reported_and_the_others_still_run(tmp_path, tiny_dirs, toys, capsys):
    other = (
        "\n  - name: b\n    model: {m}\n    steps: [{{toy_scale: {{factor: 3}}}}]\n"
        "  - name: c\n    model: {m}\n    steps: [{{toy_scale: {{fail: true}}}}]\n"
    ).format(m=tiny_dirs["gpt2"])
    path = _recipe(tmp_path, tiny_dirs["bert"], "      - toy_scale: {fail: true}\n", extra_jobs=other)
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "job a, step 1: toy_scale: asked to fail" in err and "job c, step 1" in err
    jobs = {j["job"]: j for j in json.loads((out / "report.json").read_text())["jobs"]}
    assert [jobs[n]["status"] for n in "abc"] == ["failed", "ok", "failed"]
    assert jobs["b"]["rows"][1]["fidelity"]["cos_mean"] < 1.0
    assert "toy_scale: asked to fail" in (out / "report.md").read_text()


def test_a_step_another_job_computed_is_copied(tmp_path, tiny_dirs, toys):
    other = f"\n  - name: b\n    model: {tiny_dirs['bert']}\n    steps:\n{STEPS3}"
    path = _recipe(tmp_path, tiny_dirs["bert"], "      - toy_scale: {factor: 2.0, noise: 0.01}\n", extra_jobs=other)
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out)]) == 0
    rows = _rows(out)
    assert rows["b"][1]["cached"] is True and rows["b"][1]["key"] == rows["a"][1]["key"]
    assert ToyScale.calls == 2  # a's step, then b's second step
    assert (out / "b" / "01-toy_scale" / "model.safetensors").read_bytes() == (
        out / "a" / "01-toy_scale" / "model.safetensors"
    ).read_bytes()


def test_matrix_writes_one_folder_per_point_and_job_selection(tmp_path, tiny_dirs, toys):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"version: 1\njobs:\n  - name: s-${{f}}\n    model: {tiny_dirs['llama']}\n"
        f"    calibration: {CAL}\n    matrix: {{f: [0.5, 2.0]}}\n"
        "    steps: [{toy_scale: {factor: '${f}'}}]\n"
        f"  - name: other\n    model: {tiny_dirs['llama']}\n    steps: [toy_scale]\n"
    )
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out), "--job", "s-${f}"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["s-0.5", "s-2.0"]
    assert list(_rows(out)) == ["s-0.5", "s-2.0"]
    assert main(["run", str(path), "-o", str(out), "--job", "other"]) == 0
    assert list(_rows(out)) == ["s-0.5", "s-2.0", "other"]  # the report keeps the earlier jobs
    fid = {k: v[1]["fidelity"]["cos_mean"] for k, v in _rows(out).items()}
    assert fid["other"] == 1.0 and fid["s-0.5"] < 1.0 and fid["s-2.0"] < 1.0


def test_report_files_hold_the_printed_numbers(tmp_path, tiny_dirs, toys, capsys):
    path = _recipe(
        tmp_path, tiny_dirs["bert"], "      - toy_scale: {factor: 1.5}\n      - export: {latency_seq_len: 32}\n"
    )
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    data = report.read(out)
    rows = data["jobs"][0]["rows"]
    assert [r["pass"] for r in rows] == ["original", "toy_scale", "export"]
    exp = rows[2]
    assert exp["latency_ms"] > 0 and exp["bytes"] == (out / "a" / "02-export" / "model.onnx").stat().st_size
    assert 0.5 < exp["fidelity"]["cos_mean"] < 1.0
    # every number the terminal printed is in report.md, in the same row
    md = (out / "report.md").read_text()
    _, cells = report.ledger_table(data)
    for row in cells:
        assert "| " + " | ".join(row) + " |" in md
        for cell in row[2:-1]:
            assert cell in printed
    for r in rows[1:]:
        assert f"{r['fidelity']['cos_mean']:.4f}" in printed
    assert f"{exp['latency_ms']:.2f}" in printed
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # `squeeze report OUT` prints the same table again
    assert main(["report", str(out)]) == 0
    again = capsys.readouterr().out
    assert _table(again) == _table(printed)
    assert main(["report", str(tmp_path / "nothing")]) == 2


def _table(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("│")]


# --------------------------------------------------------------------------------------------
# Every recipe in recipes/ runs (tiny ones fully, MiniLM ones on MINILM_SAMPLES samples)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_recipe_runs(path, recipe_copy, tmp_path, capsys):
    args = ["run", str(recipe_copy / path.name), "-o", str(tmp_path / "out")]
    if path.stem.startswith("minilm"):
        args += ["--samples", str(MINILM_SAMPLES)]
    rc = main(args)
    assert rc == 0, capsys.readouterr().err
    data = report.read(tmp_path / "out")
    recipe = load_recipe(recipe_copy / path.name)
    assert [j["job"] for j in data["jobs"]] == [j.name for j in recipe.jobs]
    for job, spec in zip(data["jobs"], recipe.jobs):
        assert job["status"] == "ok"
        assert [r["pass"] for r in job["rows"]] == ["original", *[s.pass_name for s in spec.steps]]
        for r in job["rows"][1:]:
            assert r["fidelity"]["cos_mean"] > 0
            assert (r["latency_ms"] is not None) == (r["pass"] == "export")


def test_progress_reaches_the_reporter_and_stays_quiet_off_a_terminal(tmp_path, tiny_dirs, toys, capsys):
    path = _recipe(tmp_path, tiny_dirs["vit"], "      - toy_scale: {factor: 2.0}\n      - toy_cal\n")
    events = []

    class Recorder(pipeline.Reporter):
        def job_start(self, index, total, job):
            events.append(("job", index, total))

        def step_start(self, job, index, total, name, cached):
            events.append(("step", index, total, name))

        def progress(self, label, done, total):
            events.append((label, done, total))

    pipeline.run(load_recipe(path), tmp_path / "out", reporter=Recorder())
    assert events[:2] == [("job", 0, 1), ("step", 1, 2, "toy_scale")]
    assert ("toy layers", 4, 4) in events  # the pass's inner loop (4 layers)
    assert events[-1] == ("step", 2, 2, "toy_cal")
    assert main(["run", str(path), "-o", str(tmp_path / "out2")]) == 0
    printed = capsys.readouterr().out
    assert "toy layers" not in printed and "step toy_scale" not in printed  # no bars off a terminal
