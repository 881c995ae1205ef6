"""The ``chat`` training text: templates expanded, both kinds of package read, the eval part apart."""

from __future__ import annotations

import pytest

from squeeze.compress import chat
from squeeze.compress.chat import chat_lines, chat_packages, expand_template
from squeeze.compress.errors import SqueezeError


def test_templates_expand_every_alternative_and_drop_slots():
    assert expand_template("(what|which) time is it in {location}") == ["what time is it", "which time is it"]
    assert expand_template("set (a|an) (alarm|timer)") == ["set a alarm", "set a timer", "set an alarm", "set an timer"]
    assert expand_template("tell me about  {query} ,") == ["tell me"]  # the slot's dangling "about" goes too
    assert expand_template("how windy is it") == ["how windy is it"]


def test_chat_reads_the_corpus_and_the_skills_and_holds_every_tenth_line_apart():
    found = chat_packages()
    assert chat.CHAT_CORPUS in found and "ovos_skill_weather" in found  # the Makefile installs them
    train, held = chat_lines("train"), chat_lines("eval")
    assert len(train) > 3000 and len(held) > 300
    assert not set(train) & set(held)
    assert abs(len(train) / len(held) - 9) < 0.1  # every 10th of the sorted lines
    every = sorted(train + held)
    assert every[chat.CHAT_EVAL_EVERY - 1] in held and every[0] in train
    assert all(t == t.lower() and "{" not in t and "|" not in t for t in train)
    assert all(2 <= len(t.split()) <= chat.MAX_WORDS for t in train)
    assert "will it rain today" in train + held  # an intent example of the weather skill
    assert "what is a computer?" in train + held  # a chatterbot-corpus question


def test_without_the_corpus_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(chat, "chat_packages", lambda: {})
    with pytest.raises(SqueezeError, match="pip install --no-deps chatterbot-corpus"):
        chat_lines("train")
    assert not chat.chat_available()
