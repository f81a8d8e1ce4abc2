"""The HTTP layer's defences against a fake engine: strict request types, values the engine cannot
use, bounded work per request (n, prompts, logprob entries, prompt text), per-request failures that
leave other requests alone, Retry-After, request framing, body timeouts and log escaping."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from shoal.engine.outputs import RequestFailed
from shoal.server.api import build_app, printable
from shoal.server.limits import ServerLimits
from tests.unit.test_protocol_app import CHAT, FakeEngine, FakeTokenizer, assert_error, client_for, run, sse_events


class CountingTokenizer(FakeTokenizer):
    """One character per token, and at most one character per token: text longer than the context
    can be refused unread."""

    max_chars_per_token = 1

    def __init__(self) -> None:
        super().__init__()
        self.encoded = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded += 1
        return super().encode(text, add_special_tokens)


class FailingEngine(FakeEngine):
    """Requests whose prompt contains "poison" fail after `after` outputs with `error`."""

    def __init__(self, error: RequestFailed, after: int = 0, **kw: object) -> None:
        super().__init__(**kw)
        self.error, self.after = error, after
        self.max_waiting = 8

    async def generate(self, prompt, params, request_id):  # noqa: ANN001, ANN201
        text = self.tokenizer.decode(prompt["prompt_token_ids"]) if isinstance(prompt, dict) else prompt
        k = 0
        async for out in super().generate(prompt, params, request_id):
            if "poison" in text and k >= self.after:
                raise self.error
            k += 1
            yield out


@pytest.mark.parametrize("field, value, param", [
    ("max_tokens", "10", None), ("stream", "yes", None), ("temperature", "1", None), ("n", 2.0, None),
    ("seed", 2**64, None), ("seed", -(2**63) - 1, None), ("top_k", 10**30, None),
    ("stop_token_ids", [-1], "stop_token_ids.0"), ("repetition_penalty", 0, None),
])
def test_values_are_strict_and_in_range(field, value, param):
    async def go():
        async with client_for(FakeEngine()) as c:
            return await c.post("/v1/chat/completions", json={**CHAT, field: value})
    assert_error(run(go()), 400, param=param or field)


def test_non_finite_numbers_are_400():
    async def go():
        async with client_for(FakeEngine()) as c:
            body = json.dumps(CHAT)[:-1] + ', "temperature": NaN}'
            return await c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_error(run(go()), 400, param="temperature")


def test_n_over_the_server_limit_is_400():
    eng = FakeEngine()

    async def go():
        async with client_for(eng, limits=ServerLimits(max_n=4)) as c:
            return await c.post("/v1/chat/completions", json={**CHAT, "n": 5})
    err = assert_error(run(go()), 400, param="n")
    assert "--max-n" in err["message"] and not eng.seen


def test_more_sequences_than_the_queue_holds_are_refused_before_any_work():
    eng = FailingEngine(RequestFailed("unused"))

    async def go():
        async with client_for(eng) as c:
            many = await c.post("/v1/completions", json={"prompt": ["a"] * 9, "max_tokens": 2})
            n_times = await c.post("/v1/completions", json={"prompt": ["a"] * 3, "n": 3, "max_tokens": 2})
            fits = await c.post("/v1/completions", json={"prompt": ["a"] * 4, "n": 2, "max_tokens": 2})
            one_big_n = await c.post("/v1/completions", json={"prompt": "a", "n": 16, "max_tokens": 2})
            return many, n_times, fits, one_big_n
    many, n_times, fits, one_big_n = run(go())
    for r in (many, n_times):
        assert "--max-waiting" in assert_error(r, 400, param="prompt")["message"]
    assert fits.status_code == 200 and one_big_n.status_code == 200
    assert len(eng.seen) == 5  # the refused requests reached nothing


def test_logprob_entries_are_bounded():
    limits = ServerLimits(max_logprob_entries=100)

    async def go():
        async with client_for(FakeEngine(), limits=limits) as c:
            big = await c.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 20,
                                                              "max_tokens": 10})
            small = await c.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 20,
                                                                "max_tokens": 4})
            unbounded = await c.post("/v1/completions", json={"prompt": "hi", "logprobs": 1, "max_tokens": None})
            return big, small, unbounded
    big, small, unbounded = run(go())
    assert "--max-logprob-entries" in assert_error(big, 400, param="logprobs")["message"]
    assert small.status_code == 200
    # no max_tokens: up to the context (64 - 2 tokens) × 2 entries > 100
    assert_error(unbounded, 400, param="logprobs")


def test_prompt_text_that_cannot_fit_is_refused_without_tokenizing():
    eng = FakeEngine(max_model_len=64)
    eng.tokenizer = CountingTokenizer()

    async def go():
        async with client_for(eng) as c:
            long = await c.post("/v1/completions", json={"prompt": "x" * 65, "max_tokens": 1})
            chat = await c.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user",
                                                                                    "content": "y" * 100}]})
            fits = await c.post("/v1/completions", json={"prompt": "x" * 10, "max_tokens": 1})
            return long, chat, fits
    long, chat, fits = run(go())
    assert_error(long, 400, param="prompt", code="context_length_exceeded")
    assert_error(chat, 400, param="messages", code="context_length_exceeded")
    assert fits.status_code == 200
    assert eng.tokenizer.encoded == 1  # only the prompt that fits was tokenized


def test_overloaded_503_says_when_to_retry():
    eng = FakeEngine()
    eng.overloaded = True

    async def go():
        async with client_for(eng) as c:
            return await c.post("/v1/chat/completions", json=CHAT)
    r = run(go())
    assert_error(r, 503, code="overloaded")
    assert r.headers["retry-after"] == "1"


def test_a_request_that_fails_in_the_engine_ends_alone():
    """A client-caused failure is a 400 (before any output) or an error event then [DONE] (mid-stream);
    another failure is a 500 for that request only. The healthy request beside it completes."""
    bad = FailingEngine(RequestFailed("non-finite logits", client_error=True))
    internal = FailingEngine(RequestFailed("detokenizing failed"))
    mid = FailingEngine(RequestFailed("non-finite logits", client_error=True), after=3)
    poison = {**CHAT, "messages": [{"role": "user", "content": "poison"}]}

    async def go():
        async with client_for(bad) as c:
            r400, ok = await asyncio.gather(c.post("/v1/chat/completions", json=poison),
                                            c.post("/v1/chat/completions", json=CHAT))
        async with client_for(internal) as c:
            r500 = await c.post("/v1/chat/completions", json=poison)
        async with client_for(mid) as c:
            stream = await c.post("/v1/chat/completions", json={**poison, "stream": True})
        return r400, ok, r500, stream
    r400, ok, r500, stream = run(go())
    assert_error(r400, 400, code="invalid_sampling")
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert "detokenizing" not in assert_error(r500, 500, code="internal_error")["message"]
    events = sse_events(stream.text)
    assert stream.status_code == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "invalid_sampling"
    assert [e for e in events[:-2] if e["choices"][0]["delta"].get("content")]  # the first tokens got out


async def _asgi(app, method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes] | None,
                hang: bool = False) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request straight through the ASGI app; `hang`: the body never arrives."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80), "scheme": "http", "root_path": ""}
    pending = list(chunks or [])
    sent: list[dict] = []

    async def receive():  # noqa: ANN202
        if hang:
            await asyncio.sleep(3600)
        if pending:
            return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message):  # noqa: ANN001, ANN202
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_content_length_with_transfer_encoding_is_refused_and_closed():
    app = build_app(FakeEngine(), "fake-model")
    body = json.dumps(CHAT).encode()
    status, headers, data = run(_asgi(app, "POST", "/v1/chat/completions", [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"transfer-encoding", b"chunked")], [body]))
    assert status == 400 and headers[b"connection"] == b"close"
    assert "Transfer-Encoding" in json.loads(data)["error"]["message"]


def test_a_body_that_never_arrives_gets_408():
    app = build_app(FakeEngine(), "fake-model", limits=ServerLimits(body_timeout_s=0.2))
    status, headers, data = run(_asgi(app, "POST", "/v1/chat/completions",
                                      [(b"content-type", b"application/json")], None, hang=True))
    assert status == 408 and json.loads(data)["error"]["code"] == "request_timeout"


def test_control_characters_in_a_path_cannot_forge_log_lines(caplog):
    app = build_app(FakeEngine(), "fake-model")
    forged = '/v1/x\n127.0.0.1:1 "GET /admin HTTP/1.1" 200'
    with caplog.at_level(logging.INFO, logger="shoal.server"):
        status, _, _ = run(_asgi(app, "GET", forged, [], None))
    assert status == 404
    lines = [r.getMessage() for r in caplog.records if "/v1/x" in r.getMessage()]
    assert lines and all("\n" not in m for m in lines)
    assert printable("a\nb\x1b[31m") == "a\\nb\\x1b[31m" and printable("x" * 5, limit=3) == "xxx..."


def test_logprobs_on_the_wire_are_always_finite():
    from shoal.server.completions import _lp

    assert _lp(float("nan")) == _lp(float("-inf")) == -9999.0 and _lp(-1.5) == -1.5
