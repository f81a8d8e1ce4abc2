"""Streaming detokenization: deltas join to the full decode and never hold half a character."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.loader import IncrementalDetokenizer, Tokenizer, resolve_model

TEXTS = [
    "你好，世界！今天天气很好。",
    "emoji 🤗🚀👍🏽 and ZWJ 👩‍👩‍👧 done",
    "日本語のテキスト and English, mixed 한국어",
    "plain ascii text with  double  spaces\nand newlines",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_source(resolve_model(None))


def _stream(tok, prompt_ids, ids, skip=True):
    d = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    deltas = [d.add(i) for i in ids]
    deltas.append(d.flush())
    return d, deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_full_decode(tok, text):
    prompt = tok.encode("<|im_start|>assistant\n")
    ids = tok.encode(text, add_special_tokens=False)
    d, deltas = _stream(tok, prompt, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert d.text == text
    assert not any("\ufffd" in x for x in deltas)
    assert deltas[-1] == ""  # nothing left over for valid text


def test_multibyte_char_is_held_until_complete(tok):
    ids = tok.encode("🤗", add_special_tokens=False)
    assert len(ids) > 1, "the emoji should span several byte-level tokens"
    d = IncrementalDetokenizer(tok, [])
    out = [d.add(i) for i in ids]
    assert out[:-1] == [""] * (len(ids) - 1) and out[-1] == "🤗"


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("hi<|im_end|>", add_special_tokens=False)
    assert "".join(_stream(tok, [], ids)[1]) == "hi"
    assert "".join(_stream(tok, [], ids, skip=False)[1]) == "hi<|im_end|>"


def test_flush_emits_dangling_bytes(tok):
    ids = tok.encode("🤗", add_special_tokens=False)[:-1]
    d, deltas = _stream(tok, [], ids)
    assert deltas[:-1] == [""] * len(ids) and deltas[-1] == tok.decode(ids)


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab 你好🤗é\n€")), max_size=30))
def test_any_text_streams_back(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    _, deltas = _stream(tok, tok.encode("x"), ids)
    assert "".join(deltas) == text and not any("\ufffd" in x for x in deltas)
