"""Hugging Face attribute names live only in compress/families.py."""

from __future__ import annotations

import re
from pathlib import Path

from squeeze.compress.families import FAMILIES

ROOT = Path(__file__).resolve().parent.parent


def _hf_names() -> set[str]:
    names: set[str] = set()
    for fam in FAMILIES.values():
        paths = [fam.layers_path, *fam.embeddings, fam.final_norm or "", fam.head or ""]
        for v in fam.roles.values():
            paths.extend(v if isinstance(v, tuple) else [v or ""])
        for p in paths:
            names.update(part for part in p.split(".") if part)
    # generic words that are also ordinary English or Python are not evidence of a leak
    return names - {"attention", "self", "output", "dense", "mlp", "layers", "embeddings", "norm", "classifier", "attn", "h", "layer", "encoder",
                     "q", "k", "v", "o"}  # squeeze's own role names (MPNet's projections are called the same)


def test_no_hugging_face_names_in_passes():
    pattern = re.compile(r"""(\.|["'])(%s)\b""" % "|".join(sorted(map(re.escape, _hf_names()))))
    leaks = []
    for path in (ROOT / "compress" / "passes").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                leaks.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not leaks, "\n".join(leaks)
