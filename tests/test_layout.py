"""Hugging Face attribute names live only in compress/families/ (DESIGN.md section 3).

Widened by the re-floor: every file under compress/ and kernels/ except the families package, not only
compress/passes/. The names are the module-path parts of every family's roles, so a new family
widens the check by itself; role keys (``q``, ``attn_out``) are squeeze's own words and generic
English or Python words are not evidence of a leak.
"""

from __future__ import annotations

import re
from pathlib import Path

from squeeze.compress.families import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
GENERIC = {
    "attention",
    "self",
    "output",
    "dense",
    "mlp",
    "layers",
    "embeddings",
    "norm",
    "classifier",
    "attn",
    "h",
    "layer",
    "encoder",
    "transformer",
    "key",
    "value",
    "intermediate",
    "o",
    "LayerNorm",
}


def _hf_names() -> set[str]:
    names: set[str] = set()
    roles: set[str] = set()
    for fam in FAMILIES.values():
        paths = [fam.layers_path, *fam.embeddings, fam.final_norm or "", fam.head or ""]
        for key, v in fam.roles.items():
            roles.add(key)
            paths.extend(v if isinstance(v, tuple) else [v or ""])
        for p in paths:
            names.update(part for part in p.split(".") if part)
    return names - GENERIC - roles


def _files() -> list[Path]:
    files = [*(ROOT / "compress").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
    return sorted(f for f in files if (ROOT / "compress" / "families") not in f.parents)


def leaks(names: set[str], files: list[Path]) -> list[str]:
    pattern = re.compile(r"""(\.|["'])({})\b""".format("|".join(sorted(map(re.escape, names)))))
    found = []
    for path in files:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                found.append(f"{path}:{i}: {line.strip()}")
    return found


def test_the_check_finds_a_leak(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("w = layer.self_attn.q_proj.weight  # a pass reaching into llama by name\n")
    assert len(leaks(_hf_names(), [bad])) == 1
    bad.write_text('q = family.role(layer, "q")  # by role: fine\n')
    assert leaks(_hf_names(), [bad]) == []


def test_no_hugging_face_names_outside_families():
    found = leaks(_hf_names(), _files())
    assert not found, "\n".join(found)
