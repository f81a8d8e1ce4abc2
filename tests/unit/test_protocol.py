"""Request schemas: OpenAI's defaults, extras ignored, ranges checked with the field named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shoal.server.errors import validation_error
from shoal.server.protocol import ChatCompletionRequest, ChatCompletionChunk, ChatStreamChoice, CompletionRequest, DeltaMessage

MSG = [{"role": "user", "content": "hi"}]


def test_defaults_and_extras():
    r = ChatCompletionRequest.model_validate({"messages": MSG, "model": "m", "parallel_tool_calls": True, "x": 1})
    assert r.max_new_tokens is None and r.n == 1 and r.temperature is None and not r.stream
    assert r.num_logprobs is None
    c = CompletionRequest.model_validate({"prompt": "a"})
    assert c.max_tokens == 16  # OpenAI's default for completions


def test_max_completion_tokens_wins():
    r = ChatCompletionRequest.model_validate({"messages": MSG, "max_tokens": 5, "max_completion_tokens": 7})
    assert r.max_new_tokens == 7


def test_logprobs_mapping():
    assert ChatCompletionRequest.model_validate({"messages": MSG, "logprobs": True}).num_logprobs == 0
    assert ChatCompletionRequest.model_validate({"messages": MSG, "logprobs": True, "top_logprobs": 3}).num_logprobs == 3


def test_content_parts_join():
    r = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert r.messages[0].text() == "ab"


@pytest.mark.parametrize("prompt,expected", [
    ("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_prompt_forms(prompt, expected):
    assert CompletionRequest.model_validate({"prompt": prompt}).prompts() == expected


@pytest.mark.parametrize("body,param", [
    ({"messages": MSG, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": MSG, "top_logprobs": 30, "logprobs": True}, "top_logprobs"),
    ({"messages": MSG, "stop": ["a"] * 17}, "stop"),
    ({"messages": MSG, "stop": [""]}, "stop"),
    ({"messages": [{"role": "user"}], "n": "many"}, "n"),
])
def test_errors_name_the_field(body, param):
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate(body)
    err = validation_error(e.value)
    assert err.status == 400 and err.param == param and err.type == "invalid_request_error"


def test_delta_serializes_only_set_fields():
    ch = ChatCompletionChunk(id="x", created=1, model="m", choices=[ChatStreamChoice(index=0, delta=DeltaMessage())])
    d = ch.model_dump(mode="json")
    assert d["choices"][0]["delta"] == {} and d["choices"][0]["finish_reason"] is None
    assert DeltaMessage(content="a").model_dump() == {"content": "a"}
