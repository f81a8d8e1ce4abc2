"""The default model behind the real server, driven by the official `openai` client: chat and
completions, streaming and not, n, stop, seed, logprobs, usage; greedy streaming equals greedy
non-streaming."""

from __future__ import annotations

import math

import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.timeout(900)

MODEL = "SmolLM2-135M-Instruct"
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
PROMPT = "The capital of France is"


def test_models(default_server: Server):
    models = default_server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert default_server.client().models.retrieve(MODEL).id == MODEL


def test_chat_non_streaming(default_server: Server):
    r = default_server.client().chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    (c,) = r.choices
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.prompt_tokens > 10  # the template added its system/user framing
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream_greedy(default_server: Server):
    client = default_server.client()
    full = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert content_chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_completion_stream_equals_non_stream_greedy(default_server: Server):
    client = default_server.client()
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert full.object == "text_completion" and full.usage.completion_tokens > 0
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_n_choices(default_server: Server):
    client = default_server.client()
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6, n=2, temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    stream = list(client.chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=6, n=2, temperature=1.0, seed=3, stream=True,
        stream_options={"include_usage": True},
    ))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason}
    assert set(finished) == {0, 1}
    texts = {i: "".join(c.choices[0].delta.content or "" for c in stream if c.choices and c.choices[0].index == i)
             for i in (0, 1)}
    # same seed → the streamed choices equal the non-streamed ones
    assert texts == {c.index: c.message.content or "" for c in r.choices}
    assert stream[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_n2_and_batch(default_server: Server):
    r = default_server.client().completions.create(model=MODEL, prompt=[PROMPT, "Once upon a time"], max_tokens=4,
                                                   n=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both samples agree
    assert 4 <= r.usage.completion_tokens <= 16  # usage counts every choice of every prompt


def test_stop_string(default_server: Server):
    client = default_server.client()
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    words = base.split()
    assert len(words) >= 3, f"greedy text too short to pick a stop word: {base!r}"
    stop = words[2]
    expected = base[: base.find(stop)]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_seed_reproducible(default_server: Server):
    client = default_server.client()
    kw = dict(model=MODEL, messages=MSGS, max_tokens=12, temperature=1.0, top_p=0.95, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_chat_logprobs(default_server: Server):
    r = default_server.client().chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
    )
    lps = r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens
    for t in lps:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        # greedy: the chosen token is the most likely one (or tied with it)
        best = t.top_logprobs[0].logprob
        assert math.isclose(t.logprob, best, abs_tol=1e-4)
        assert t.token in {x.token for x in t.top_logprobs if math.isclose(x.logprob, best, abs_tol=1e-4)}


def test_completion_logprobs(default_server: Server):
    r = default_server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                                   logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens).startswith(r.choices[0].text[:1])


def test_extensions_and_penalties(default_server: Server):
    r = default_server.client().chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=6, temperature=0.7, presence_penalty=0.5, frequency_penalty=0.5,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True},
    )
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


def test_max_completion_tokens(default_server: Server):
    r = default_server.client().chat.completions.create(model=MODEL, messages=MSGS, max_completion_tokens=3,
                                                        temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
