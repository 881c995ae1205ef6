"""Hugging Face module names and config keys live only in compress/families/ (DESIGN.md section 3).

Every file under compress/ and kernels/ outside the families package is read. Module names are
the module-path parts of every family's roles; config keys are the keys the families package
itself reads from a config (``config.X``, ``cfg.X``, ``getattr(config, "X", ...)``, the layer
count key). Both sets come from the families' own source, so a new family or a new config fact
widens the check by itself. Role keys (``q``, ``attn_out``), generic English or Python words, and
the few config keys that are also squeeze's own words (``model_type`` and ``architecture(s)``,
recorded in every manifest; ``head_dim``, a weight space's property) are not evidence of a leak.

A config key leaks when it is read as an attribute (``cfg.vocab_size``; a call such as
``family.vocab_size(cfg)`` is the family's accessor) or through ``getattr(x, "vocab_size"...)``.
Dictionary keys in squeeze's own output (``inspect``'s ``"vocab_size"``, a merge error's fact
names) are squeeze's vocabulary, not a read of a config.
"""

from __future__ import annotations

import re
from pathlib import Path

from squeeze.compress.families import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
FAMILIES_DIR = ROOT / "compress" / "families"
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
OWN_WORDS = {"model_type", "architectures", "head_dim"}


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


def config_keys() -> set[str]:
    """Every config key the families package reads."""
    src = "\n".join(p.read_text() for p in sorted(FAMILIES_DIR.glob("*.py")))
    keys = set(re.findall(r"""getattr\((?:config|cfg), ["'](\w+)["']""", src))
    keys |= set(re.findall(r"""\b(?:config|cfg)\.(\w+)\b(?!\s*\()""", src))
    keys |= set(re.findall(r"""_KEY: ClassVar\[str\] = ["'](\w+)["']""", src))
    return keys - OWN_WORDS


def _files() -> list[Path]:
    files = [*(ROOT / "compress").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
    return sorted(f for f in files if FAMILIES_DIR not in f.parents)


def _alternation(words: set[str]) -> str:
    return "|".join(sorted(map(re.escape, words)))


def leaks(names: set[str], files: list[Path], keys: frozenset[str] | set[str] = frozenset()) -> list[str]:
    patterns = []
    if names:
        patterns.append(re.compile(rf"""(\.|["'])({_alternation(names)})\b"""))
    if keys:
        k = _alternation(set(keys))
        patterns.append(re.compile(rf"""\.({k})\b(?!\s*\()|getattr\([^,()]+,\s*["']({k})["']"""))
    found = []
    for path in files:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(p.search(code) for p in patterns):
                found.append(f"{path}:{i}: {line.strip()}")
    return found


def test_the_check_finds_a_leak(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("w = layer.self_attn.q_proj.weight  # a pass reaching into llama by name\n")
    assert len(leaks(_hf_names(), [bad])) == 1
    bad.write_text('q = family.role(layer, "q")  # by role: fine\n')
    assert leaks(_hf_names(), [bad]) == []


def test_the_check_finds_a_config_key(tmp_path):
    keys = config_keys()
    assert {"vocab_size", "max_position_embeddings", "num_attention_heads", "num_hidden_layers"} <= keys
    assert {"image_size", "num_channels", "hidden_size", "intermediate_size"} <= keys
    bad = tmp_path / "bad.py"
    for line in (
        "ids = torch.randint(0, int(cfg.vocab_size), (1, 8))\n",
        "seq = int(getattr(model.config, 'max_position_embeddings', 0) or 0)\n",
        "n = ckpt.config.num_hidden_layers\n",
    ):
        bad.write_text(line)
        assert len(leaks(set(), [bad], keys)) == 1, line
    bad.write_text("ids = torch.randint(0, family.vocab_size(cfg), (1, 8))  # the family's accessor\n")
    assert leaks(set(), [bad], keys) == []


def test_no_hugging_face_names_or_config_keys_outside_families():
    found = leaks(_hf_names(), _files(), config_keys())
    assert not found, "\n".join(found)
