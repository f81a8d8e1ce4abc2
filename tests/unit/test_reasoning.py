"""The <think> parser: one-shot and incremental agree for every way of cutting the text into deltas,
tags split across deltas are never leaked, and a prompt that opened <think> starts inside the thought."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.server.reasoning import ReasoningParser, prompt_opens_thinking


def feed_all(parser: ReasoningParser, pieces: list[str]) -> tuple[str, str]:
    r, c = [], []
    for p in pieces:
        a, b = parser.feed(p)
        r.append(a)
        c.append(b)
    a, b = parser.finish()
    return "".join(r) + a, "".join(c) + b


def test_split_with_both_tags():
    assert ReasoningParser().split("<think>\nhmm\n</think>\n\nAnswer") == ("\nhmm\n", "\n\nAnswer")


def test_template_opened_think():
    assert ReasoningParser(started=True).split("hmm</think>Answer") == ("hmm", "Answer")


def test_unclosed_thought_is_all_reasoning():
    assert ReasoningParser(started=True).split("still thinking") == ("still thinking", None)
    assert ReasoningParser().split("<think>still") == ("still", None)


def test_plain_output_is_content():
    assert ReasoningParser().split("just an answer") == (None, "just an answer")
    assert ReasoningParser().split("  a <think> in the middle") == (None, "  a <think> in the middle")
    assert ReasoningParser().split("") == (None, None)


def test_partial_tags_are_held_back():
    p = ReasoningParser(started=True)
    assert p.feed("abc</th") == ("abc", "")
    assert p.feed("ink>x") == ("", "x")
    p = ReasoningParser()
    assert p.feed("<thi") == ("", "")
    assert p.feed("nk>r") == ("r", "")
    p = ReasoningParser(started=True)
    assert p.feed("a<") == ("a", "")
    assert p.feed("b") == ("<b", "")  # not a tag after all


def test_prompt_opens_thinking():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<think>a</think><|im_start|>assistant\n")
    assert not prompt_opens_thinking("user said <think> then more text")
    assert not prompt_opens_thinking("no tags")


alphabet = st.sampled_from(["a", " ", "\n", "<", ">", "/", "t", "h", "<think>", "</think>", "</th", "ink>"])


@settings(max_examples=300, deadline=None)
@given(st.lists(alphabet, max_size=30), st.booleans(), st.lists(st.integers(0, 200), max_size=10))
def test_incremental_equals_one_shot(parts, started, cuts):
    text = "".join(parts)
    one = ReasoningParser(started=started).split(text)
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    r, c = feed_all(ReasoningParser(started=started), pieces)
    assert (one[0] or "") == r and (one[1] or "") == c
    # nothing is lost except the tags themselves
    assert len(r) + len(c) <= len(text)
