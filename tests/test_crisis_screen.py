"""The demo's crisis keyword screen: the same words written with invisible characters, look-alike letters or
full-width forms still match, common phrasings match, and everyday phrases do not. Expectations are written by hand."""

from __future__ import annotations

import pytest

from multimood.apps.demo import CRISIS_PATTERNS, crisis_matches, normalise_for_screen

ZWSP, ZWJ, WORD_JOINER, SOFT_HYPHEN, BOM = "\u200b", "\u200d", "\u2060", "\u00ad", "\ufeff"


@pytest.mark.parametrize("text, expected", [
    # the same words, disguised
    (f"I want to ki{ZWSP}ll myself", ["kill myself"]),
    (f"I want to kill{ZWSP}myself", ["kill myself"]),  # a zero-width space in place of the space
    (f"I want to k{ZWJ}i{WORD_JOINER}l{BOM}l m{SOFT_HYPHEN}yself", ["kill myself"]),
    ("I want to k\u0456ll myself", ["kill myself"]),  # Cyrillic і
    ("I want to kill mys\u0435lf", ["kill myself"]),  # Cyrillic е
    ("\u0455u\u0456\u0441\u0456d\u0435 is on my mind", ["suicide"]),  # Cyrillic ѕ і с і е
    ("\u0405UICIDE", ["suicide"]),  # Cyrillic capital Ѕ
    ("I w\u03b1nt to die", ["want to die"]),  # Greek α
    ("ｋｉｌｌ ｍｙｓｅｌｆ", ["kill myself"]),  # full-width forms
    ("\U0001d42c\U0001d42e\U0001d422\U0001d41c\U0001d422\U0001d41d\U0001d41e", ["suicide"]),  # mathematical bold
    ("s\u0336u\u0336icide", ["suicide"]),  # combining marks
    ("self\u2010harm", ["self-harm"]),  # Unicode hyphen
    # phrasings
    ("I don't want to live anymore", ["don't want to live"]),
    ("I don\u2019t want to live anymore.", ["don't want to live"]),  # curly apostrophe
    ("I do not want to live any more", ["don't want to live"]),
    ("honestly I dont want to live", ["don't want to live"]),
    ("I don't really want to exist anymore", ["don't want to live"]),
    ("I don't want to be alive", ["don't want to live"]),
    ("I don\u2019t want to be alive anymore", ["don't want to live"]),
    ("I'd rather be dead", ["rather be dead"]),
    ("I\u2019d rather be dead.", ["rather be dead"]),
    ("I would rather die", ["rather be dead"]),
    ("Some nights I think I'd honestly rather not wake up", ["rather be dead"]),
    ("I wish I was dead", ["want to die"]),
])
def test_screen_matches(text: str, expected: list[str]):
    assert crisis_matches([text]) == expected


@pytest.mark.parametrize("text", [
    "I don't want to live in London anymore.",
    "I don't want to live with my parents",
    "I want to live a long and happy life.",
    "I don\u2019t want to exist in a job like this",
    "I'd rather not talk about it.",
    "I would rather deal with it tomorrow",
    "I'd rather be at home right now",
    "This deadline is killing me.",
    "I skilled myself up over the summer",
    "The plant is dead and the battery died.",
    "Ｗｏｒｋ ｉｓ ｓｔｒｅｓｓｆｕｌ",
    f"I am{ZWSP} tired of my commute",
])
def test_screen_ignores_everyday_phrases(text: str):
    assert crisis_matches([text]) == []


def test_normalisation_by_hand():
    assert normalise_for_screen(f"d\u043en\u2019t{ZWSP} ｓｔｏｐ \u2014 caf\u00e9") == "don't stop - cafe"
    assert normalise_for_screen("plain text stays") == "plain text stays"


def test_every_pattern_is_reachable():
    """Each listed pattern matches at least one plain phrase (the README lists them by name)."""
    plain = {
        "suicide": "suicidal", "kill myself": "kill myself", "end my life": "end my life", "end it all": "end it all",
        "self-harm": "self harm", "hurt myself": "cut myself", "want to die": "want to die",
        "better off dead": "better off dead", "no reason to live": "not worth living", "overdose": "overdosed",
        "don't want to live": "don't want to live", "rather be dead": "I'd rather die",
    }
    assert set(plain) == set(CRISIS_PATTERNS)
    for name, text in plain.items():
        assert name in crisis_matches([text]), name
