"""Recipe schema: every shipped recipe validates and round-trips; every kind of mistake fails
before any work, naming the file, the line and the location, with exit code 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from recipe_toys import RECIPE_FILES, recipe_copy, toys  # noqa: F401  (fixtures)

from squeeze.cli.main import main
from squeeze.compress.errors import SqueezeError
from squeeze.compress.recipe import load_recipe, parse_recipe, step_classes


def test_recipes_folder_has_the_demo_a_sweep_and_every_family():
    names = {p.stem for p in RECIPE_FILES}
    assert "minilm-edge" in names
    assert any("sweep" in n for n in names)
    for family in ("bert", "vit", "llama", "gpt2"):
        assert f"tiny-{family}" in names


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_recipe_validates_and_round_trips(path, recipe_copy):
    recipe = load_recipe(recipe_copy / path.name)
    assert recipe.jobs
    text = recipe.to_yaml()
    again = parse_recipe(text, filename="dumped.yaml", base_dir=recipe_copy)
    assert again == recipe
    assert yaml.safe_load(again.to_yaml()) == yaml.safe_load(text)


# --------------------------------------------------------------------------------------------
# Mistakes: (recipe body, expected location, expected message part). The line marked "# <-" is
# the line the error must name.
# --------------------------------------------------------------------------------------------

HEAD = "version: 1\njobs:\n  - name: a\n    model: {model}\n"
CAL = "    calibration: {{source: builtin, samples: 4, eval_samples: 4}}\n"

BAD = {
    "typo_in_config": (
        HEAD + "    steps:\n      - toy_scale: {{factr: 2}}  # <-\n",
        "jobs[0].steps[0].toy_scale.factr",
        "unknown key",
    ),
    "unknown_pass": (
        HEAD + "    steps:\n      - toy_scael: {{}}  # <-\n",
        "jobs[0].steps[0].toy_scael",
        "unknown pass 'toy_scael' (did you mean 'toy_scale'?)",
    ),
    "wrong_type": (
        HEAD + "    steps:\n      - toy_scale:\n          factor: abc  # <-\n",
        "jobs[0].steps[0].toy_scale.factor",
        "valid number",
    ),
    "out_of_range": (
        HEAD + "    steps:\n      - toy_scale: {{factor: 20}}  # <-\n",
        "jobs[0].steps[0].toy_scale.factor",
        "less than or equal to 10 (got 20)",
    ),
    "export_not_last": (
        HEAD + "    steps:\n      - export: {{}}  # <-\n      - toy_scale: {{}}\n",
        "jobs[0].steps[0].export",
        "export must be the last step",
    ),
    "missing_calibration": (
        HEAD + "    calibration: null\n    steps:\n      - toy_scale\n      - toy_cal  # <-\n",
        "jobs[0].steps[1].toy_cal",
        "needs calibration data",
    ),
    "typo_in_job": (
        HEAD + "    calibraton: {{source: builtin}}  # <-\n    steps: [toy_scale]\n",
        "jobs[0].calibraton",
        "unknown key",
    ),
    "typo_in_defaults": (
        "version: 1\ndefaults:\n  calibration: {{samples: 0}}  # <-\njobs:\n  - name: a\n"
        "    model: {model}\n    steps: [toy_cal]\n",
        "defaults.calibration.samples",
        "greater than or equal to 1",
    ),
    "missing_model": (
        "version: 1\njobs:\n  - name: a\n    model: no/such/model  # <-\n    steps: [toy_scale]\n",
        "jobs[0].model",
        "no such folder",
    ),
    "missing_with_model": (
        HEAD + "    steps:\n      - merge:\n          with: [no-such-expert]  # <-\n",
        "jobs[0].steps[0].merge.with[0]",
        "no such folder",
    ),
    "missing_calibration_file": (
        HEAD + "    calibration: {{source: nothere.txt}}  # <-\n    steps: [toy_cal]\n",
        "jobs[0].calibration.source",
        "no such data file",
    ),
    "two_keys_in_a_step": (
        HEAD + "    steps:\n      - {{toy_scale: {{}}, toy_cal: {{}}}}  # <-\n",
        "jobs[0].steps[0]",
        "one-key mapping",
    ),
    "no_steps": (HEAD + "    steps: []  # <-\n", "jobs[0].steps", "at least 1 item"),
    "unknown_placeholder": (
        HEAD + "    steps:\n      - toy_scale: {{factor: '${{f}}'}}  # <-\n",
        "jobs[0].steps[0].toy_scale.factor",
        "${f} is not a matrix key",
    ),
    "unused_matrix_key": (
        HEAD + "    matrix: {{f: [1, 2]}}  # <-\n    steps: [toy_scale]\n",
        "jobs[0].matrix.f",
        "never used",
    ),
    "duplicate_job": (
        HEAD + "    steps: [toy_scale]\n  - name: a  # <-\n    model: {model}\n    steps: [toy_scale]\n",
        "jobs[1].name",
        "used twice",
    ),
    "bad_job_name": (
        "version: 1\njobs:\n  - name: a/b  # <-\n    model: {model}\n    steps: [toy_scale]\n",
        "jobs[0].name",
        "should match pattern",
    ),
    "top_level_typo": (
        "version: 1\njob: []  # <-\njobs:\n  - name: a\n    model: {model}\n    steps: [toy_scale]\n",
        "job",
        "unknown key",
    ),
    "bad_version": (
        "version: 2  # <-\njobs:\n  - name: a\n    model: {model}\n    steps: [toy_scale]\n",
        "version",
        "Input should be 1",
    ),
    "yaml_syntax": (HEAD + "    steps:\n      - toy_scale: {{factor: 2}}\n     oops: 1  # <-\n", "", "invalid YAML"),
    "duplicate_yaml_key": (HEAD + "    model: {model}  # <-\n    steps: [toy_scale]\n", "", "duplicate key 'model'"),
    "prune_out_of_range": (
        HEAD
        + CAL
        + "    steps: [toy_scale]\n  - name: b\n    model: {model}\n"
        + CAL
        + "    steps:\n      - prune: {{drop_attn: 2.5}}  # <-\n",
        "jobs[1].steps[0].prune.drop_attn",
        "at most 1.0",
    ),
}


def _write(tmp_path: Path, body: str, model: Path) -> tuple[Path, int]:
    text = body.format(model=model)
    line = next(i for i, text_line in enumerate(text.splitlines(), 1) if "# <-" in text_line)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path, line


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_recipe_names_file_line_and_location(case, tmp_path, tiny_dirs, toys, capsys):
    body, where, what = BAD[case]
    if "prune" in body and "prune" not in step_classes():
        pytest.fail("the prune pass is not registered")
    path, line = _write(tmp_path, body, tiny_dirs["bert"])
    out = tmp_path / "out"
    assert main(["recipe", "check", str(path)]) == 2
    err = capsys.readouterr().err
    prefix = f"{path}:{line}: {where}" if where else f"{path}:{line}:"
    assert prefix in err, err
    assert what in err, err
    assert main(["run", str(path), "-o", str(out)]) == 2
    assert not out.exists()  # nothing written


def test_unknown_job_for_run_is_a_user_error(tmp_path, tiny_dirs, toys, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(HEAD.format(model=tiny_dirs["bert"]) + "    steps: [toy_scale]\n")
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out), "--job", "nope"]) == 2
    assert "--job nope: no such job in the recipe; jobs: a" in capsys.readouterr().err
    assert not out.exists()


def test_many_mistakes_are_all_listed(tmp_path, tiny_dirs, toys):
    text = (
        HEAD.format(model=tiny_dirs["bert"])
        + "    steps:\n      - toy_scale: {factor: 20}\n      - toy_cal: {bits: 1}\n"
    )
    with pytest.raises(SqueezeError) as exc:
        parse_recipe(text, filename="r.yaml")
    msg = str(exc.value)
    assert msg.startswith("2 problems in the recipe")
    assert "r.yaml:6: jobs[0].steps[0].toy_scale.factor" in msg and "r.yaml:7: jobs[0].steps[1].toy_cal" in msg


# --------------------------------------------------------------------------------------------
# Defaults, matrix, paths
# --------------------------------------------------------------------------------------------


def test_defaults_merge_into_every_job(tmp_path, tiny_dirs, toys):
    text = f"""
version: 1
defaults:
  model: {tiny_dirs["bert"]}
  calibration: {{source: builtin, samples: 8, seq_len: 32}}
  steps: [toy_cal]
jobs:
  - name: a
  - name: b
    calibration: {{samples: 4}}
    steps: [toy_scale]
"""
    r = parse_recipe(text)
    a, b = r.jobs
    assert a.model == b.model == str(tiny_dirs["bert"])
    assert [s.pass_name for s in a.steps] == ["toy_cal"] and [s.pass_name for s in b.steps] == ["toy_scale"]
    assert (a.calibration.samples, a.calibration.seq_len) == (8, 32)
    assert (b.calibration.samples, b.calibration.seq_len) == (4, 32)  # mappings merge key by key


def test_matrix_fans_out_with_typed_values(tmp_path, tiny_dirs, toys):
    text = f"""
version: 1
jobs:
  - name: sweep
    model: {tiny_dirs["bert"]}
    matrix: {{f: [0.5, 2], n: [0, 1]}}
    steps:
      - toy_scale: {{factor: "${{f}}", noise: "${{n}}"}}
  - name: named-${{f}}
    model: {tiny_dirs["bert"]}
    matrix: {{f: [3]}}
    steps: [{{toy_scale: {{factor: "${{f}}"}}}}]
"""
    r = parse_recipe(text)
    assert [j.name for j in r.jobs] == [
        "sweep-f=0.5-n=0",
        "sweep-f=0.5-n=1",
        "sweep-f=2-n=0",
        "sweep-f=2-n=1",
        "named-3",
    ]
    assert [j.steps[0].config.factor for j in r.jobs] == [0.5, 0.5, 2.0, 2.0, 3.0]
    assert r.jobs[0].point == {"f": 0.5, "n": 0}
    assert [j.name for j in r.select(["sweep"]).jobs] == [j.name for j in r.jobs[:4]]
    assert [j.name for j in r.select(["named-3"]).jobs] == ["named-3"]


def test_placeholder_inside_text_and_escape(tmp_path, tiny_dirs, toys):
    root = tmp_path / "models"
    shutil.copytree(tiny_dirs["bert"], root / "bert")
    shutil.copytree(tiny_dirs["gpt2"], root / "gpt2")
    (tmp_path / "r.yaml").write_text("""
version: 1
jobs:
  - name: fam-${fam}
    model: models/${fam}
    matrix: {fam: [bert, gpt2]}
    calibration: {source: "$${literal}.txt"}
    steps: [toy_scale]
""")
    with pytest.raises(SqueezeError, match=r"\$\{literal\}\.txt: no such data file"):
        load_recipe(tmp_path / "r.yaml")
    r = load_recipe(tmp_path / "r.yaml", check_refs=False)
    assert [j.model for j in r.jobs] == [str(root / "bert"), str(root / "gpt2")]  # relative to the recipe


def test_schema_follows_the_registry(tmp_path, tiny_dirs, monkeypatch, toys):
    """A newly registered pass is a valid step with no schema change; unregistered, it is unknown."""
    text = HEAD.format(model=tiny_dirs["bert"]) + "    steps: [{toy_scale: {factor: 2}}]\n"
    assert parse_recipe(text).jobs[0].steps[0].config.factor == 2.0
    monkeypatch.delitem(__import__("squeeze.compress.passes", fromlist=["REGISTRY"]).REGISTRY, "toy_scale")
    with pytest.raises(SqueezeError, match="unknown pass 'toy_scale'"):
        parse_recipe(text)


def test_bare_step_names_and_null_configs(tiny_dirs, toys):
    text = HEAD.format(model=tiny_dirs["bert"]) + "    steps:\n      - toy_scale\n      - toy_scale:\n      - export\n"
    steps = parse_recipe(text).jobs[0].steps
    assert [s.pass_name for s in steps] == ["toy_scale", "toy_scale", "export"]
    assert steps[2].config.opset == 18
