"""A tiny model whose chat template opens `<think>` in the prompt: the server returns the thought as
`reasoning_content` and the answer as `content`, the same in streaming and non-streaming replies."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Server
from tests.e2e.tiny_model import ANSWER, REASONING

pytestmark = pytest.mark.timeout(600)

MSGS = [{"role": "user", "content": "What is it?"}]


def test_reasoning_non_streaming(reasoning_server: Server):
    r = reasoning_server.client().chat.completions.create(model="tiny-r1", messages=MSGS, max_tokens=32, temperature=0)
    msg = r.choices[0].message
    assert msg.reasoning_content == REASONING
    assert msg.content == ANSWER
    assert r.choices[0].finish_reason == "stop"


def test_reasoning_streaming(reasoning_server: Server):
    chunks = list(reasoning_server.client().chat.completions.create(
        model="tiny-r1", messages=MSGS, max_tokens=32, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning == REASONING and content == ANSWER
    # the thought streams before the answer, token by token
    kinds = [("r" if getattr(d, "reasoning_content", None) else "c") for d in deltas
             if getattr(d, "reasoning_content", None) or d.content]
    assert kinds == sorted(kinds, key=lambda k: k == "c") and kinds.count("r") > 1
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_truncated_thought_is_all_reasoning(reasoning_server: Server):
    r = reasoning_server.client().chat.completions.create(model="tiny-r1", messages=MSGS, max_tokens=2, temperature=0)
    msg = r.choices[0].message
    assert msg.content is None and msg.reasoning_content and REASONING.startswith(msg.reasoning_content)
    assert r.choices[0].finish_reason == "length"


def test_completions_are_not_split(reasoning_server: Server):
    """/v1/completions returns raw text, tags included."""
    prompt = "<|im_start|>user\nWhat is it?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    r = reasoning_server.client().completions.create(model="tiny-r1", prompt=prompt, max_tokens=32, temperature=0)
    assert r.choices[0].text == f"{REASONING}</think>{ANSWER}"
