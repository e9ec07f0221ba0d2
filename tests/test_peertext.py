"""edge.peertext: what a peer sent, made safe to print (control characters escaped, length
bounded, times that cannot raise)."""

import math

from edge import peertext


def test_plain_text_is_unchanged():
    assert peertext.text("cam1 person 0.91 motorcycle_left.png") == \
        "cam1 person 0.91 motorcycle_left.png"
    assert peertext.text("Zürich Straße 東京") == "Zürich Straße 東京"


def test_control_and_format_characters_are_escaped():
    assert peertext.text("a\x1b[31mb") == "a\\x1b[31mb"
    assert peertext.text("line\nforged\rx\x07\x00\x7f\x85") == \
        "line\\nforged\\rx\\x07\\x00\\x7f\\x85"
    assert peertext.text("\u202egnp.exe\u2028\u2029\u200b\ufeff") == \
        "\\u202egnp.exe\\u2028\\u2029\\u200b\\ufeff"
    assert peertext.text("\ud800 lone surrogate") == "\\ud800 lone surrogate"
    assert peertext.text("back\\slash") == "back\\\\slash"
    assert peertext.text("\U000e0041 tag") == "\\U000e0041 tag"


def test_length_is_bounded():
    out = peertext.text("x" * 1000000, limit=50)
    assert len(out) <= 50 + len(" ... (1000000 characters)")
    assert out.startswith("x" * 50) and out.endswith("(1000000 characters)")
    escaped = peertext.text("\x1b" * 1000, limit=40)
    assert len(escaped) < 80 and escaped.startswith("\\x1b")


def test_other_values_are_shown_as_text():
    assert peertext.text(None) == "None"
    assert peertext.text(12) == "12"
    assert peertext.text(["a\n"]) == "['a\\\\n']"


def test_times_that_cannot_be_printed_are_unknown():
    assert peertext.when(0) == "1970-01-01 00:00:00" or peertext.when(0).startswith("19")
    for value in (1e300, -1e300, float("nan"), math.inf, -math.inf, 2 ** 80, "soon", None,
                  True, 1e10 + 1):
        assert peertext.when(value) == "an unknown time", value
    assert peertext.when(1795545400.125)[:4] == "2026"
