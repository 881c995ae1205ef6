"""Bad and hostile inputs across every command (issue 16): one line, the right exit code, and
nothing outside the intended output changed.

Each case builds a workspace (a copy of a tiny model plus whatever the case needs), snapshots it,
runs the CLI in-process, and checks the exit code, that stderr is one ``error:`` line holding the
expected words, and that the workspace is byte-for-byte what it was (outside ``allowed``).
Cases named ``n<k>_...`` are the issue's numbered items.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tiny import make_tiny

from squeeze.cli.main import main

Setup = Callable[[Path, dict], list[str]]


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> content hash / "dir" / "link:target", links not followed."""
    out: dict[str, str] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(folder) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def models(tiny_dirs, tmp_path_factory):
    """The session's tiny models, a squeeze folder, and a bert of a smaller vocabulary."""
    root = tmp_path_factory.mktemp("bad_models")
    squeezed = root / "squeezed"
    assert main(["prune", str(tiny_dirs["bert"]), "--attn-layers", "1", "-o", str(squeezed)]) == 0
    small_vocab = make_tiny("bert", root / "small_vocab", layers=2, vocab_size=200)
    return {**tiny_dirs, "squeezed": squeezed, "small_vocab": small_vocab}


def _write_safetensors_header(path: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _manifest(ws: Path, edit: Callable[[dict], None]) -> None:
    path = ws / "sq" / "squeeze.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def _nan_model(ws: Path, m: dict) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(m["bert"], ws / "nan")
    state = load_file(str(ws / "nan" / "model.safetensors"))
    key = next(k for k in state if k.endswith("attention.output.dense.bias"))
    state[key][0] = torch.nan
    save_file(state, str(ws / "nan" / "model.safetensors"), metadata={"format": "pt"})


def _recipe(ws: Path, text: str, name: str = "r.yaml") -> str:
    (ws / name).write_text(text)
    return name


BOMB = "\n".join(
    [f'a0: &a0 ["{"x" * 8}"]']
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    + ["jobs: [*a7]"]
)
MATRIX = (
    "jobs:\n  - name: j-${a}-${b}-${c}\n    model: model\n    steps: [{prune: {drop_attn: 1}}]\n"
    "    matrix: {a: [%s], b: [%s], c: [%s]}\n" % ((", ".join(str(i) for i in range(1000)),) * 3)
)


def _image_folder(ws: Path, kind: str) -> str:
    from PIL import Image

    imgs = ws / "imgs"
    imgs.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(imgs / "ok.png")
    if kind == "corrupt":
        (imgs / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    else:  # 9000 x 9000 1-bit: a small file that decodes to 81 Mpx
        Image.new("1", (9000, 9000)).save(imgs / "bomb.png")
    return "imgs"


def _npz(ws: Path, **arrays) -> str:
    np.savez(ws / "d.npz", **arrays)
    return "d.npz"


def _jsonl(ws: Path, rows: list) -> str:
    (ws / "d.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return "d.jsonl"


def _put(path: Path, data: str | bytes) -> None:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _pickle(ws: Path) -> None:
    (ws / "model" / "model.safetensors").unlink()
    (ws / "model" / "pytorch_model.bin").write_bytes(os.urandom(256))


def _symlink_out(ws: Path) -> None:
    (ws / "secret.txt").write_text("api key\n")
    (ws / "model" / "notes.txt").symlink_to(ws / "secret.txt")


RUN_RECIPE = "jobs:\n  - name: a\n    model: model\n    steps: [{prune: {attn_layers: [1]}}]\n"
HELD: list = []  # locks a case holds while the command runs


def _held_run_folder(ws: Path) -> list[str]:
    import fcntl

    from squeeze.compress.paths import LOCK, mark_run_output

    mark_run_output(ws / "out")
    fh = open(ws / "out" / LOCK, "a+")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    HELD.append(fh)
    return ["run", _recipe(ws, RUN_RECIPE), "-o", "out"]


PRUNE = ["prune", "model", "--attn-layers", "1"]
SCORED = ["prune", "model", "--drop-attn", "1", "--samples", "4", "--seq-len", "8"]

# (id, setup(ws, models) -> argv, exit code, words in the one error line, paths the command may create)
CASES: list[tuple[str, Setup, int, str, tuple[str, ...]]] = [
    # ---- the numbered items
    (
        "n1_output_holds_input",
        lambda ws, m: (
            (ws / "victim").mkdir()
            or (
                shutil.move(ws / "model", ws / "victim/model")
                and ["prune", "victim/model", "--attn-layers", "1", "-o", "victim", "--force"]
            )
        ),
        2,
        "holds the input",
        (),
    ),
    (
        "n1_dot_output",
        lambda ws, m: os.chdir(ws / "model") or ["prune", ".", "--attn-layers", "1", "-o", ".", "--force"],
        2,
        "input",
        (),
    ),
    (
        "n1_dot_output_elsewhere",
        lambda ws, m: (
            (ws / "here").mkdir()
            or os.chdir(ws / "here")
            or ["prune", "../model", "--attn-layers", "1", "-o", ".", "--force"]
        ),
        2,
        "current folder",
        (),
    ),
    (
        "n3_nan_weight_export",
        lambda ws, m: _nan_model(ws, m) or ["export", "nan", "-o", "o.onnx"],
        1,
        "PyTorch output holds",
        ("o.rejected.onnx", "o.onnx.report.json"),
    ),
    ("n4_unknown_command", lambda ws, m: ["frobnicate"], 2, "No such command", ()),
    (
        "n6_symlink_out_of_folder",
        lambda ws, m: _symlink_out(ws) or [*PRUNE, "-o", "out"],
        2,
        "outside the model folder",
        (),
    ),
    (
        "n6_symlink_loop",
        lambda ws, m: (ws / "model/loop").symlink_to("loop") or [*PRUNE, "-o", "out"],
        2,
        "symlink loop",
        (),
    ),
    (
        "n6_dir_link_loop",
        lambda ws, m: (ws / "model/sub").mkdir() or (ws / "model/sub/up").symlink_to("..") or [*PRUNE, "-o", "out"],
        2,
        "symlink loop",
        (),
    ),
    ("n7_billion_laughs", lambda ws, m: ["recipe", "check", _recipe(ws, BOMB)], 2, "expands to more than", ()),
    ("n7_matrix_product", lambda ws, m: ["recipe", "check", _recipe(ws, MATRIX)], 2, "more than 1000 jobs", ()),
    (
        "n7_manifest_layers",
        lambda ws, m: (
            _manifest(ws, lambda d: d["base"]["config"].update(num_hidden_layers=1_000_000)) or ["inspect", "sq"]
        ),
        2,
        "layers 1000000 is out of bounds",
        (),
    ),
    (
        "n7_manifest_width",
        lambda ws, m: (
            _manifest(ws, lambda d: d["base"]["config"].update(intermediate_size=60_000)) or ["inspect", "sq"]
        ),
        2,
        "does not belong to these weights",
        (),
    ),
    ("n8_check_empty_onnx", lambda ws, m: (ws / "e.onnx").touch() or ["check", "e.onnx"], 2, "ONNX", ()),
    ("n10_proc", lambda ws, m: [*PRUNE, "-o", "/proc/squeeze-x/out"], 2, "not writable", ()),
    ("n10_parent_is_file", lambda ws, m: _put(ws / "f", "x") or [*PRUNE, "-o", "f/out"], 2, "is a file", ()),
    ("n10_inside_input", lambda ws, m: [*PRUNE, "-o", "model/sub/out"], 2, "inside the input", ()),
    ("n10_quantize_inside_input", lambda ws, m: ["quantize", "model", "-o", "model/q"], 2, "inside the input", ()),
    (
        "n10_onnx_is_folder",
        lambda ws, m: (ws / "d.onnx").mkdir() or ["export", "model", "-o", "d.onnx", "--force"],
        2,
        "is a folder",
        (),
    ),
    ("n10_output_is_file", lambda ws, m: _put(ws / "out", "x") or [*PRUNE, "-o", "out", "--force"], 2, "is a file", ()),
    (
        "n10_run_inside_model",
        lambda ws, m: ["run", _recipe(ws, RUN_RECIPE), "-o", "model/out"],
        2,
        "inside the input",
        (),
    ),
    (
        "n12_run_into_user_folder",
        lambda ws, m: (
            (ws / "mine").mkdir()
            or _put(ws / "mine/report.md", "my notes")
            or ["run", _recipe(ws, RUN_RECIPE), "-o", "mine"]
        ),
        2,
        "holds files squeeze did not write",
        (),
    ),
    ("n12_run_locked", lambda ws, m: _held_run_folder(ws), 2, "in use by another squeeze run", ()),
    (
        "n11_nan_in_recipe",
        lambda ws, m: [
            "recipe",
            "check",
            _recipe(ws, "jobs:\n  - name: a\n    model: model\n    steps:\n      - prune: {drop_attn: .nan}\n"),
        ],
        2,
        "r.yaml:5: jobs[0].steps[0].prune.drop_attn: .nan is not a finite number",
        (),
    ),
    (
        "n13_corrupt_report",
        lambda ws, m: (
            (ws / "run").mkdir() or _put(ws / "run/report.json", '{"format": 1, "jobs": [1]}') or ["report", "run"]
        ),
        2,
        "not a squeeze report (jobs[0]",
        (),
    ),
    (
        "n13_report_not_utf8",
        lambda ws, m: (ws / "run").mkdir() or _put(ws / "run/report.json", b"\xff\xfe{") or ["report", "run"],
        2,
        "not a readable report",
        (),
    ),
    # ---- inspect and checkpoints
    ("missing_folder", lambda ws, m: ["inspect", "nope/none"], 2, "nope/none", ()),
    ("file_not_folder", lambda ws, m: ["inspect", "model/config.json"], 2, "not a folder", ()),
    ("no_config", lambda ws, m: (ws / "model/config.json").unlink() or ["inspect", "model"], 2, "no config.json", ()),
    (
        "config_not_json",
        lambda ws, m: _put(ws / "model/config.json", "{oops") or ["inspect", "model"],
        2,
        "not valid JSON",
        (),
    ),
    (
        "unsupported_type",
        lambda ws, m: _put(ws / "model/config.json", '{"model_type": "t5"}') or ["inspect", "model"],
        2,
        "unsupported model_type 't5'",
        (),
    ),
    (
        "weights_are_a_folder",
        lambda ws, m: (
            (ws / "model/model.safetensors").unlink()
            or (ws / "model/model.safetensors").mkdir()
            or ["inspect", "model"]
        ),
        2,
        "not a file",
        (),
    ),
    (
        "truncated_weights",
        lambda ws, m: (
            _put(ws / "model/model.safetensors", (ws / "model/model.safetensors").read_bytes()[:-100])
            or ["inspect", "model"]
        ),
        2,
        "truncated or corrupt",
        (),
    ),
    (
        "weights_header_garbage",
        lambda ws, m: _put(ws / "model/model.safetensors", os.urandom(64)) or ["inspect", "model"],
        2,
        "not a valid safetensors file",
        (),
    ),
    (
        "weights_header_bad_offsets",
        lambda ws, m: (
            _write_safetensors_header(
                ws / "model/model.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": "x"}}
            )
            or ["inspect", "model"]
        ),
        2,
        "not a valid safetensors file",
        (),
    ),
    (
        "pickle_refused",
        lambda ws, m: _pickle(ws) or ["inspect", "model"],
        2,
        "pickle weights can run arbitrary code",
        (),
    ),
    (
        "pickle_garbage_trusted",
        lambda ws, m: _pickle(ws) or [*PRUNE, "-o", "out", "--trust-pickle"],
        2,
        "could not load weights",
        (),
    ),
    (
        "shard_index_escapes",
        lambda ws, m: (
            _put(ws / "model/a.safetensors", (ws / "model/model.safetensors").read_bytes())
            or (ws / "model/model.safetensors").unlink()
            or _put(ws / "model/model.safetensors.index.json", '{"weight_map": {"w": "../secret.safetensors"}}')
            or ["inspect", "model"]
        ),
        2,
        "plain file names",
        (),
    ),
    (
        "config_shape_mismatch",
        lambda ws, m: (
            _put(
                ws / "model/config.json",
                (ws / "model/config.json").read_text().replace('"intermediate_size": 64', '"intermediate_size": 48'),
            )
            or ["inspect", "model"]
        ),
        2,
        "do not match the config",
        (),
    ),
    (
        "manifest_not_json",
        lambda ws, m: _put(ws / "sq/squeeze.json", "[") or ["inspect", "sq"],
        2,
        "not valid JSON",
        (),
    ),
    (
        "manifest_unknown_pass",
        lambda ws, m: _manifest(ws, lambda d: d["edits"][0].update({"pass": "evil"})) or ["inspect", "sq"],
        2,
        "unknown pass 'evil'",
        (),
    ),
    (
        "manifest_bad_edit",
        lambda ws, m: _manifest(ws, lambda d: d["edits"][0]["result"].update(attention=[99])) or ["inspect", "sq"],
        2,
        "edit 0 (prune)",
        (),
    ),
    (
        "manifest_newer_format",
        lambda ws, m: _manifest(ws, lambda d: d.update(format=2)) or ["inspect", "sq"],
        2,
        "newer than this squeeze",
        (),
    ),
    (
        "manifest_bad_base_config",
        lambda ws, m: _manifest(ws, lambda d: d["base"]["config"].update(hidden_size="wide")) or ["inspect", "sq"],
        2,
        "squeeze.json",
        (),
    ),
    (
        "flipped_weight_byte",
        lambda ws, m: _flip_byte(ws / "sq/model.safetensors") or ["inspect", "sq"],
        2,
        "sha256 differs",
        (),
    ),
    # ---- prune / quantize options and data
    ("output_exists", lambda ws, m: (ws / "out").mkdir() or [*PRUNE, "-o", "out"], 2, "already exists", ()),
    ("bad_amount", lambda ws, m: ["prune", "model", "--drop-attn", "abc", "-o", "out"], 2, "--drop-attn", ()),
    ("bad_layer_list", lambda ws, m: ["prune", "model", "--attn-layers", "1,x", "-o", "out"], 2, "--attn-layers", ()),
    ("calib_missing", lambda ws, m: [*SCORED, "--calib", "none.txt", "-o", "out"], 2, "no such calibration data", ()),
    (
        "calib_folder_for_text",
        lambda ws, m: (ws / "texts").mkdir() or [*SCORED, "--calib", "texts", "-o", "out"],
        2,
        "is a folder",
        (),
    ),
    (
        "calib_empty",
        lambda ws, m: _put(ws / "e.txt", "\n\n") or [*SCORED, "--calib", "e.txt", "-o", "out"],
        2,
        "empty file",
        (),
    ),
    (
        "calib_jsonl_invalid",
        lambda ws, m: [*SCORED, "--calib", _jsonl(ws, ['{"text": "a"}', "{nope"]), "-o", "out"],
        2,
        "d.jsonl:2: invalid JSON",
        (),
    ),
    (
        "calib_jsonl_float_label",
        lambda ws, m: [*SCORED, "--calib", _jsonl(ws, [{"text": "a b", "label": 1.5}] * 8), "-o", "out"],
        2,
        "class index",
        (),
    ),
    ("quantize_bad_bits", lambda ws, m: ["quantize", "model", "--weights", "int99", "-o", "out"], 2, "--weights", ()),
    (
        "vit_corrupt_image",
        lambda ws, m: (
            shutil.copytree(m["vit"], ws / "vit")
            and [
                "prune",
                "vit",
                "--drop-attn",
                "1",
                "--samples",
                "4",
                "--calib",
                _image_folder(ws, "corrupt"),
                "-o",
                "out",
            ]
        ),
        2,
        "not a readable image",
        (),
    ),
    (
        "vit_image_bomb",
        lambda ws, m: (
            shutil.copytree(m["vit"], ws / "vit")
            and [
                "prune",
                "vit",
                "--drop-attn",
                "1",
                "--samples",
                "4",
                "--calib",
                _image_folder(ws, "bomb"),
                "-o",
                "out",
            ]
        ),
        2,
        "DecompressionBomb",
        (),
    ),
    (
        "vit_npz_random_bytes",
        lambda ws, m: (
            shutil.copytree(m["vit"], ws / "vit")
            and (
                _put(ws / "d.npz", os.urandom(300))
                or ["prune", "vit", "--drop-attn", "1", "--calib", "d.npz", "-o", "out"]
            )
        ),
        2,
        "not an .npz archive",
        (),
    ),
    (
        "vit_npz_nan_pixels",
        lambda ws, m: (
            shutil.copytree(m["vit"], ws / "vit")
            and [
                "prune",
                "vit",
                "--drop-attn",
                "1",
                "--calib",
                _npz(ws, pixel_values=np.full((4, 3, 16, 16), np.nan)),
                "-o",
                "out",
            ]
        ),
        2,
        "finite numbers",
        (),
    ),
    (
        "vit_npz_float_labels",
        lambda ws, m: (
            shutil.copytree(m["vit"], ws / "vit")
            and [
                "prune",
                "vit",
                "--drop-attn",
                "1",
                "--calib",
                _npz(ws, pixel_values=np.zeros((4, 3, 16, 16)), labels=np.array([0.5] * 4)),
                "-o",
                "out",
            ]
        ),
        2,
        "integer class index",
        (),
    ),
    # ---- export, check, eval
    ("export_bad_target", lambda ws, m: ["export", "model", "-o", "m.onnx", "--target", "nope"], 2, "target", ()),
    ("export_bad_opset", lambda ws, m: ["export", "model", "-o", "m.onnx", "--opset", "99"], 2, "opset", ()),
    ("export_bad_batch", lambda ws, m: ["export", "model", "-o", "m.onnx", "--batch", "0"], 2, "batch", ()),
    (
        "export_ref_other_family",
        lambda ws, m: ["export", "model", "-o", "m.onnx", "--ref", str(m["gpt2"])],
        2,
        "--ref is a gpt2 model",
        (),
    ),
    (
        "export_report_exists",
        lambda ws, m: _put(ws / "m.onnx.report.json", "{}") or ["export", "model", "-o", "m.onnx"],
        2,
        "earlier export",
        (),
    ),
    (
        "export_rejected_exists",
        lambda ws, m: _put(ws / "m.rejected.onnx", "x") or ["export", "model", "-o", "m.onnx"],
        2,
        "earlier export",
        (),
    ),
    (
        "check_random_bytes",
        lambda ws, m: _put(ws / "r.onnx", os.urandom(200)) or ["check", "r.onnx"],
        2,
        "not a readable ONNX model",
        (),
    ),
    ("check_missing", lambda ws, m: ["check", "none.onnx"], 2, "no such file", ()),
    (
        "eval_corrupt_onnx",
        lambda ws, m: _put(ws / "r.onnx", os.urandom(200)) or ["eval", "r.onnx", "--ref", "model"],
        2,
        "not a readable ONNX model",
        (),
    ),
    (
        "eval_onnx_is_folder",
        lambda ws, m: (ws / "d.onnx").mkdir() or ["eval", "d.onnx", "--ref", "model"],
        2,
        "is a folder, not an .onnx file",
        (),
    ),
    (
        "eval_other_vocabulary",
        lambda ws, m: ["eval", str(m["small_vocab"]), "--ref", "model", "--samples", "4"],
        2,
        "vocabulary",
        (),
    ),
    ("eval_other_family", lambda ws, m: ["eval", str(m["gpt2"]), "--ref", "model"], 2, "is a gpt2 model", ()),
    (
        "eval_jsonl_string_label",
        lambda ws, m: ["eval", "model", "--ref", "model", "--data", _jsonl(ws, [{"text": "a", "label": "pos"}] * 4)],
        2,
        "class index",
        (),
    ),
    # ---- kernels, recipes, report
    ("kernels_huge_seed", lambda ws, m: ["kernels", "--validate", "--seed", str(2**70)], 2, "--seed", ()),
    ("kernels_negative_seed", lambda ws, m: ["kernels", "--validate", "--seed", "-1"], 2, "--seed", ()),
    ("recipe_missing", lambda ws, m: ["recipe", "check", "none.yaml"], 2, "none.yaml", ()),
    (
        "recipe_too_big",
        lambda ws, m: ["recipe", "check", _recipe(ws, "# " + "x" * (1 << 20) + "\njobs: []\n")],
        2,
        "a recipe is at most",
        (),
    ),
    (
        "recipe_inf",
        lambda ws, m: [
            "recipe",
            "check",
            _recipe(ws, "jobs:\n  - name: a\n    model: model\n    steps:\n      - prune: {drop_attn: -.inf}\n"),
        ],
        2,
        "is not a finite number",
        (),
    ),
    (
        "recipe_mapping_key",
        lambda ws, m: ["recipe", "check", _recipe(ws, "? {a: 1}\n: 2\njobs: []\n")],
        2,
        "a key must be a plain value",
        (),
    ),
    ("report_missing", lambda ws, m: ["report", "nowhere"], 2, "no report.json", ()),
]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("setup", "code", "words", "allowed"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(setup, code, words, allowed, models, tmp_path, monkeypatch, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(models["bert"], ws / "model")
    shutil.copytree(models["squeezed"], ws / "sq")
    monkeypatch.chdir(ws)
    argv = setup(ws, models)
    capsys.readouterr()
    before = snapshot(tmp_path)
    got = main(argv)
    for fh in HELD:
        fh.close()
    HELD.clear()
    _, err = capsys.readouterr()
    # plain progress lines ("stage n/m (t s)") of work done before a late failure are not errors
    lines = [x for x in err.strip().splitlines() if not re.fullmatch(r"\S.* \(\d+ s\)", x)]
    assert got == code, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert words in lines[0], lines[0]
    for bad in ("Traceback", "weights_only=False", "allow_pickle", "above report"):
        assert bad not in err
    after = snapshot(tmp_path)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert {c for c in changed if not c.startswith(tuple(f"ws/{a}" for a in allowed))} == set()
    assert not [p for p in ws.rglob(".*tmp-*")], "a temporary file was left behind"
