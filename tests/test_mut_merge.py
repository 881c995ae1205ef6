"""``merge``: behaviour the mutation run of passes/merge found untested (issue 17).

Refusals name the experts ("model 1", "model 2" when no names are given) and say what differs:
the first differing tokenizer entry and how many differ, or the first differing sample text.
"""

from __future__ import annotations

import pytest
from tiny import build_tiny

from squeeze.compress.errors import SqueezeError
from squeeze.compress.passes.merge.compat import _diff_hint, check_models


def test_refusal_names_unnamed_models_from_one():
    with pytest.raises(SqueezeError) as err:
        check_models([build_tiny("llama"), build_tiny("gpt2")])
    assert str(err.value) == "cannot merge: model 1 is a llama model, model 2 is a gpt2 model"


def test_diff_hint_says_what_differs():
    a = {"<pad>": 0, "hello": 5, "world": 6}
    b = {"<pad>": 0, "hello": 7, "world": 8}
    assert _diff_hint(a, b) == " (e.g. 'hello': 5 vs 7; 2 entries differ)"
    assert _diff_hint({"x": 1}, {"y": 1}) == " (e.g. 'x': 1 vs None; 2 entries differ)"
    assert _diff_hint(a, dict(a)) == ""
    assert _diff_hint(a, ["hello"]) == ""  # a dict against a list: no hint, no error
    samples_a, samples_b = ["[CLS] the cat sat", "x"], ["[CLS] a cat sat", "x"]
    assert _diff_hint(samples_a, samples_b) == " (first sample: [CLS] th... vs [CLS] a ...)"
    assert _diff_hint(samples_a, list(samples_a)) == ""
    assert _diff_hint([], samples_b) == ""
