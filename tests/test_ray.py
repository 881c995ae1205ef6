"""``squeeze run --executor ray``: a 4-point matrix run as Ray tasks (a local Ray instance) gives the
same step folders and report as ``--executor local``; a worker killed mid-step is retried and the
outputs are the same again."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'squeeze[ray]')")

import recipe_toys  # noqa: E402
from recipe_toys import ToyScale, toys  # noqa: E402, F401  (fixture)

from squeeze.cli.main import main  # noqa: E402
from squeeze.compress import checkpoint  # noqa: E402
from squeeze.compress.passes import REGISTRY  # noqa: E402
from squeeze.compress.pipeline import VOLATILE  # noqa: E402

STEP2_NOISE = 0.02
#: what one execution measures (and so differs between two runs): not compared
MEASURED = (*VOLATILE, "pass_seconds")
#: set in the Ray workers' environment only: where ToyDie marks that it died once
DIE_MARK = "SQUEEZE_TEST_DIE_MARK"

RECIPE = """version: 1
defaults:
  calibration: {{source: builtin, samples: 4, eval_samples: 4, seq_len: 16}}
jobs:
  - name: m-${{f}}
    model: {model}
    matrix: {{f: [0.5, 1.5, 2.0, 3.0]}}
    steps:
      - toy_scale:
          factor: ${{f}}
          noise: 0.01
      - toy_scale: {{factor: 0.5, noise: 0.02}}
"""


class ToyDie(ToyScale):
    """toy_scale whose Ray worker is SIGKILLed once, in step 2, while saving the step's weights
    (half the file written, the folder still a hidden temporary). Never in this process."""

    def apply(self, models, ctx):
        mark = os.environ.get(DIE_MARK)
        if mark and self.config.noise == STEP2_NOISE and not os.path.exists(mark):
            Path(mark).write_text(str(os.getpid()))
            real = checkpoint.save_weights

            def die_half_way(model, path):
                real(model, path)
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                os.kill(os.getpid(), signal.SIGKILL)

            checkpoint.save_weights = die_half_way  # this worker process only: it is about to die
        return super().apply(models, ctx)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    mark = tmp_path_factory.mktemp("die") / "died"
    # the toy passes live in tests/, which a worker cannot import: ship them by value
    ray.cloudpickle.register_pickle_by_value(recipe_toys)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # the workers get DIE_MARK; this process (the local runs) does not
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {DIE_MARK: str(mark)}})
    yield mark
    ray.shutdown()


def _strip(data):
    if isinstance(data, dict):
        return {k: _strip(v) for k, v in data.items() if k not in MEASURED}
    if isinstance(data, list):
        return [_strip(v) for v in data]
    return data


def _tree(out: Path) -> dict[str, object]:
    """Every file of a run: bytes, JSON without the measured seconds / memory (paths made relative)."""
    tree: dict[str, object] = {}
    for p in sorted(out.rglob("*")):
        rel = str(p.relative_to(out))
        if p.is_dir() or p.name in (".squeeze.lock", "report.png", "report.md"):  # a pid; renderings of report.json
            continue
        if p.suffix == ".json":
            tree[rel] = _strip(json.loads(p.read_text().replace(str(out), "OUT")))
        else:
            tree[rel] = p.read_bytes()
    return tree


def _run(tmp_path: Path, model: Path, out: str, *extra: str) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(model=model))
    assert main(["run", str(recipe), "-o", str(tmp_path / out), *extra]) == 0
    return tmp_path / out


def test_ray_matrix_equals_local_and_a_killed_worker_is_retried(tmp_path, tiny_dirs, toys, monkeypatch, ray_cluster):
    local = _tree(_run(tmp_path, tiny_dirs["bert"], "local"))
    ray_out = _run(tmp_path, tiny_dirs["bert"], "ray", "--executor", "ray")
    assert sorted(p.name for p in ray_out.iterdir() if p.is_dir()) == ["m-0.5", "m-1.5", "m-2.0", "m-3.0"]
    got = _tree(ray_out)
    assert got.keys() == local.keys()
    assert got == local  # weights and configs byte for byte; marks and report.json but for timings

    # a rerun on Ray finds every step finished
    ToyScale.calls = 0
    again = _run(tmp_path, tiny_dirs["bert"], "ray", "--executor", "ray")
    rows = [r for j in json.loads((again / "report.json").read_text())["jobs"] for r in j["rows"][1:]]
    assert len(rows) == 8 and all(r["cached"] for r in rows)

    # fault injection: a worker is killed half way through saving a step 2; Ray retries its task
    monkeypatch.setitem(REGISTRY, "toy_scale", ToyDie)
    died = _run(tmp_path, tiny_dirs["bert"], "died", "--executor", "ray")
    assert ray_cluster.exists()
    want, got = dict(local), _tree(died)
    # nothing the dead worker left is in the output: every file equals the local run's ...
    assert {k: v for k, v in got.items() if k != "report.json"} == {k: v for k, v in want.items() if k != "report.json"}
    # ... and so does the report, but that the retried job found its step 1 finished
    cached = [(j["job"], r["step"]) for j in got["report.json"]["jobs"] for r in j["rows"][1:] if r.pop("cached")]
    assert len(cached) == 1 and cached[0][1] == 1
    for j in want["report.json"]["jobs"]:
        for r in j["rows"][1:]:
            r.pop("cached")
    assert got["report.json"] == want["report.json"]


def test_ray_executor_user_errors(tmp_path, tiny_dirs):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(model=tiny_dirs["bert"]))
    out = tmp_path / "out"
    assert main(["run", str(recipe), "-o", str(out), "--executor", "spark"]) == 2
    assert main(["run", str(recipe), "-o", str(out), "--address", "auto"]) == 2  # --address without ray
    assert not out.exists()  # nothing written
