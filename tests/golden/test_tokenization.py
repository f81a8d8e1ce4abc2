"""The default model's tokenizer, rebuilt by shoal from GGUF metadata, against transformers'
GGUF tokenizer: same ids, same text back, same chat prompt."""

from __future__ import annotations

import os

import pytest

from shoal.loader import Tokenizer, resolve_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 2024; we're at 3.14159 and 1,000,000 items.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tprint(fib(10))  # tab & spaces",
    "你好，世界！今天天气很好。机器学习模型",
    "日本語のテキストとカタカナ、ひらがな。",
    "emoji 🤗🚀👍🏽 and flags 🇫🇷 and ZWJ 👩‍👩‍👧",
    "   leading spaces, trailing spaces   ",
    "many\n\n\nnewlines\r\nand\ttabs\t\t and    runs      of spaces",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "mixed <|im_end|>special<|endoftext|> tokens inside text",
    "Ünïcödé àccents — “quotes” ‘single’ … ellipsis ß",
    "",
    " ",
    "https://example.com/path?q=1&x=y#frag",
    "Русский текст и ελληνικά",
]


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoTokenizer

    src = resolve_model(None)
    hf = AutoTokenizer.from_pretrained(os.path.dirname(src.path), gguf_file=os.path.basename(src.path))
    return Tokenizer.from_source(src), hf


@pytest.mark.parametrize("text", CORPUS)
def test_encode_decode_match_transformers(pair, text):
    ours, hf = pair
    for special in (True, False):
        ids = ours.encode(text, add_special_tokens=special)
        assert ids == hf.encode(text, add_special_tokens=special)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids, skip_special_tokens=False) == text


def test_special_ids_and_vocab(pair):
    ours, hf = pair
    assert ours.vocab_size == len(hf) == 49152
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert ours.eos_token_ids == {0, 2}  # <|im_end|> and <|endoftext|>
    assert ours.token_to_id("<|im_start|>") == 1 and ours.id_to_token(2) == "<|im_end|>"
    assert not ours.add_bos_token


@pytest.mark.parametrize("with_system", [True, False])
def test_chat_template_matches_transformers(pair, with_system):
    ours, hf = pair
    messages = [
        {"role": "user", "content": "Write a haiku about 海."},
        {"role": "assistant", "content": "Waves fold into foam 🌊"},
        {"role": "user", "content": "Another one?"},
    ]
    if with_system:
        messages.insert(0, {"role": "system", "content": "You are terse."})
    for gen in (True, False):
        want = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want
