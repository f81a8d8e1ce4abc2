"""The HTTP layer against a fake engine with AsyncEngine's interface: wire shapes (OpenAI's), error
mapping (status + body), SSE framing, reasoning split, abort on disconnect, metrics. No model."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from shoal.engine.llm_engine import EngineOverloaded, PromptTooLong
from shoal.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from shoal.loader.chat_template import render_chat_template
from shoal.sampling_params import SamplingParams
from shoal.server.api import build_app


class FakeTokenizer:
    """One character per token (id = code point)."""

    bos_token = None
    eos_token = "<eos>"

    def __init__(self, chat_template: str | None = None) -> None:
        self.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def token_to_id(self, t: str) -> int | None:
        return None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kw: object) -> str:
        return render_chat_template(self.chat_template, messages, add_generation_prompt, **kw)


class FakeEngine:
    """Streams `reply` one character per step (~1 ms apart), n times, honouring max_tokens/stop."""

    def __init__(self, reply: str = "Hello world, fake engine here.", chat_template: str | None = None,
                 max_model_len: int = 64, step_s: float = 0.001) -> None:
        self.reply = reply
        self.tokenizer = FakeTokenizer(chat_template)
        self.max_model_len = max_model_len
        self.step_s = step_s
        self.overloaded = False
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.seen: list[tuple[object, SamplingParams]] = []

    def stats(self) -> dict[str, float]:
        return {"num_running": len(self.running), "num_waiting": 0, "kv_cache_usage": 0.0, "kv_blocks_total": 8,
                "kv_blocks_used": len(self.running), "prefix_cache_queries": 10, "prefix_cache_hits": 5,
                "prompt_tokens": 0, "generation_tokens": 0, "num_preemptions": 3}

    def abort(self, rid: str) -> None:
        if rid in self.running:
            self.aborted.append(rid)
        self.running.discard(rid)

    async def generate(self, prompt, params: SamplingParams, request_id: str):
        if self.overloaded:
            raise EngineOverloaded("waiting queue is full")
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(f"prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens")
        self.seen.append((prompt, params))
        self.running.add(request_id)
        metrics = RequestMetrics(arrival_time=time.monotonic())
        limit = min(params.max_tokens or 10**9, self.max_model_len - len(ids))
        outs = [CompletionOutput(i, "", [], logprobs=[] if params.logprobs is not None else None) for i in range(params.n)]
        finished = False
        try:
            for step in range(len(self.reply) + 1):
                await asyncio.sleep(self.step_s)
                for o in outs:
                    if o.finish_reason:
                        continue
                    if step == len(self.reply):
                        o.finish_reason = "stop"
                        continue
                    ch = self.reply[step]
                    o.token_ids.append(ord(ch))
                    o.text += ch
                    if o.logprobs is not None:
                        o.logprobs.append(TokenLogprob(ord(ch), ch, -0.5, [(ord(ch), ch, -0.5), (0, "x", -float("inf"))][: params.logprobs]))
                    for s in params.stop:
                        if s in o.text:
                            o.text = o.text[: o.text.index(s)]
                            o.finish_reason, o.stop_reason = "stop", s
                    if not o.finish_reason and len(o.token_ids) >= limit:
                        o.finish_reason = "length"
                done = all(o.finish_reason for o in outs)
                yield RequestOutput(request_id, None, list(ids),
                                    [CompletionOutput(o.index, o.text, list(o.token_ids), o.finish_reason, o.stop_reason,
                                                      list(o.logprobs) if o.logprobs is not None else None)
                                     for o in outs], done, metrics)
                if done:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)
            self.running.discard(request_id)


def client_for(engine: FakeEngine, **kw: object) -> httpx.AsyncClient:
    app = build_app(engine, "fake-model", **kw)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def sse_events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in r.text
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_non_streaming_shape_and_usage():
    async def go():
        async with client_for(FakeEngine(reply="Hi there")) as c:
            r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
            assert body["model"] == "fake-model"
            (choice,) = body["choices"]
            assert choice["message"]["role"] == "assistant"
            assert choice["message"]["content"] == "Hi th"
            assert choice["finish_reason"] == "length"
            u = body["usage"]
            assert u["completion_tokens"] == 5 and u["total_tokens"] == u["prompt_tokens"] + 5
    run(go())


def test_chat_streaming_framing_matches_openai():
    async def go():
        async with client_for(FakeEngine(reply="abc")) as c:
            r = await c.post("/v1/chat/completions",
                             json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            ev = sse_events(r.text)
            assert ev[-1] == "[DONE]"
            chunks = ev[:-1]
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            assert len({c["id"] for c in chunks}) == 1
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            assert text == "abc"
            last_choice = chunks[-2]["choices"][0]
            assert last_choice["delta"] == {} and last_choice["finish_reason"] == "stop"
            assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
            assert all(c["usage"] is None for c in chunks[:-1])
    run(go())


def test_stream_without_usage_has_no_usage_key():
    async def go():
        async with client_for(FakeEngine(reply="ab")) as c:
            r = await c.post("/v1/completions", json={"prompt": "x", "stream": True})
            chunks = sse_events(r.text)[:-1]
            assert chunks and all("usage" not in ch for ch in chunks)
            assert "".join(ch["choices"][0]["text"] for ch in chunks) == "ab"
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    run(go())


def test_sampling_fields_reach_the_engine():
    async def go():
        eng = FakeEngine()
        async with client_for(eng) as c:
            r = await c.post("/v1/chat/completions", json={
                **CHAT, "temperature": 0.3, "top_p": 0.9, "max_completion_tokens": 4, "stop": ["zz"], "seed": 7,
                "n": 2, "presence_penalty": 0.5, "frequency_penalty": -0.5, "logprobs": True, "top_logprobs": 2,
                "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "some_unknown_field": {"x": 1},
            })
            assert r.status_code == 200, r.text
            _, p = eng.seen[-1]
            assert (p.temperature, p.top_p, p.max_tokens, p.stop, p.seed, p.n) == (0.3, 0.9, 4, ["zz"], 7, 2)
            assert (p.presence_penalty, p.frequency_penalty, p.logprobs) == (0.5, -0.5, 2)
            assert (p.top_k, p.min_p, p.repetition_penalty) == (5, 0.1, 1.1)
            body = r.json()
            assert [ch["index"] for ch in body["choices"]] == [0, 1]
            lp = body["choices"][0]["logprobs"]["content"]
            assert len(lp) == 4 and len(lp[0]["top_logprobs"]) == 2
            assert lp[0]["top_logprobs"][1]["logprob"] == -9999.0  # -inf is not JSON
    run(go())


def test_completions_batch_prompts_echo_and_logprobs():
    async def go():
        async with client_for(FakeEngine(reply="xyz")) as c:
            r = await c.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "echo": True})
            assert r.status_code == 200, r.text
            ch = r.json()["choices"]
            assert [x["index"] for x in ch] == [0, 1, 2, 3]
            assert [x["text"] for x in ch] == ["axyz", "axyz", "bxyz", "bxyz"]
            r = await c.post("/v1/completions", json={"prompt": [1, 2, 3], "logprobs": 1, "max_tokens": 2})
            lp = r.json()["choices"][0]["logprobs"]
            assert lp["tokens"] == ["x", "y"] and lp["text_offset"] == [0, 1]
            assert lp["top_logprobs"][0] == {"x": -0.5}
    run(go())


def test_reasoning_split_streaming_and_not():
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<think>\n{% endif %}"
    reply = "let me think</think>The answer."

    async def go():
        async with client_for(FakeEngine(reply=reply, chat_template=template)) as c:
            r = await c.post("/v1/chat/completions", json=CHAT)
            msg = r.json()["choices"][0]["message"]
            assert msg["reasoning_content"] == "let me think"
            assert msg["content"] == "The answer."
            r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
            chunks = [e for e in sse_events(r.text) if e != "[DONE]"]
            deltas = [ch["choices"][0]["delta"] for ch in chunks]
            assert "".join(d.get("reasoning_content") or "" for d in deltas) == "let me think"
            assert "".join(d.get("content") or "" for d in deltas) == "The answer."
            assert not any("<think>" in json.dumps(d) or "</think>" in json.dumps(d) for d in deltas)
    run(go())


def test_no_reasoning_split_for_plain_models():
    async def go():
        async with client_for(FakeEngine(reply="a</think>b")) as c:
            msg = (await c.post("/v1/chat/completions", json=CHAT)).json()["choices"][0]["message"]
            assert msg["content"] == "a</think>b" and msg["reasoning_content"] is None
    run(go())


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 3}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "min_tokens": 9, "max_tokens": 2}, "min_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({}, "messages"),
])
def test_invalid_chat_fields_are_400_with_param(body, param):
    async def go():
        async with client_for(FakeEngine()) as c:
            assert_error(await c.post("/v1/chat/completions", json=body), 400, param=param)
    run(go())


def test_invalid_json_and_non_object_bodies_are_400():
    async def go():
        async with client_for(FakeEngine()) as c:
            assert_error(await c.post("/v1/chat/completions", content=b"{not json"), 400)
            assert_error(await c.post("/v1/completions", content=b"[1, 2]"), 400)
            assert_error(await c.post("/v1/completions", content=b""), 400)
            assert_error(await c.post("/v1/completions", json={"prompt": []}), 400, param="prompt")
            assert_error(await c.post("/v1/completions", json={"prompt": "a", "suffix": "b"}), 400, param="suffix")
    run(go())


def test_prompt_too_long_is_400_context_length_exceeded():
    async def go():
        async with client_for(FakeEngine(max_model_len=16)) as c:
            r = await c.post("/v1/completions", json={"prompt": "x" * 40})
            assert_error(r, 400, param="prompt", code="context_length_exceeded")
            r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True,
                                                            "messages": [{"role": "user", "content": "y" * 40}]})
            assert_error(r, 400, param="messages", code="context_length_exceeded")
    run(go())


def test_unknown_model_404_and_models_list():
    async def go():
        async with client_for(FakeEngine()) as c:
            assert_error(await c.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404,
                         param="model", code="model_not_found")
            r = await c.get("/v1/models")
            assert [m["id"] for m in r.json()["data"]] == ["fake-model"]
            assert_error(await c.get("/v1/models/other"), 404)
            assert (await c.get("/v1/models/fake-model")).json()["id"] == "fake-model"
            assert_error(await c.get("/no/such/route"), 404)
    run(go())


def test_api_key_401():
    async def go():
        async with client_for(FakeEngine(), api_key="s3cret") as c:
            assert_error(await c.post("/v1/chat/completions", json=CHAT), 401, code="invalid_api_key")
            r = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer wrong"})
            assert_error(r, 401)
            r = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200
            assert (await c.get("/health")).status_code == 200  # health stays open for probes
    run(go())


def test_body_limit_413_by_header_and_by_stream():
    async def go():
        async with client_for(FakeEngine(), max_body_bytes=1000) as c:
            big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
            assert_error(await c.post("/v1/chat/completions", json=big), 413)

            async def chunks():
                for _ in range(10):
                    yield b" " * 500

            r = await c.post("/v1/chat/completions", content=chunks())  # chunked: no Content-Length
            assert_error(r, 413)
    run(go())


def test_overloaded_503():
    async def go():
        eng = FakeEngine()
        eng.overloaded = True
        async with client_for(eng) as c:
            assert_error(await c.post("/v1/chat/completions", json=CHAT), 503, code="overloaded")
            assert_error(await c.post("/v1/completions", json={"prompt": "a", "stream": True}), 503)
    run(go())


def test_request_chat_template_is_off_by_default_and_sandboxed_when_on():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"

    async def go():
        async with client_for(FakeEngine()) as c:
            assert_error(await c.post("/v1/chat/completions", json={**CHAT, "chat_template": evil}), 400,
                         param="chat_template")
        async with client_for(FakeEngine(), allow_request_chat_template=True) as c:
            err = assert_error(await c.post("/v1/chat/completions", json={**CHAT, "chat_template": evil}), 400,
                               param="chat_template", code="chat_template_error")
            assert "unsafe" in err["message"] or "Security" in err["message"]
            ok = await c.post("/v1/chat/completions", json={**CHAT, "chat_template": "{{ messages[0]['content'] }}"})
            assert ok.status_code == 200
    run(go())


def test_engine_crash_is_generic_500_without_traceback():
    class Broken(FakeEngine):
        async def generate(self, prompt, params, request_id):
            raise KeyError("secret internals")
            yield  # pragma: no cover

    async def go():
        async with client_for(Broken()) as c:
            err = assert_error(await c.post("/v1/chat/completions", json=CHAT), 500)
            assert "secret" not in err["message"]
    run(go())


async def _drive_and_disconnect(app, body: dict, after_bodies: int, after_s: float | None = None) -> list[dict]:
    """Call the ASGI app directly; the client hangs up after `after_bodies` body messages
    (or after `after_s` seconds)."""
    disconnect = asyncio.Event()
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)
        if sum(1 for s in sent if s["type"] == "http.response.body") == after_bodies:
            disconnect.set()

    if after_s is not None:
        asyncio.get_running_loop().call_later(after_s, disconnect.set)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "scheme": "http",
             "server": ("test", 80), "client": ("c", 1), "root_path": ""}
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


def test_client_disconnect_mid_stream_aborts():
    async def go():
        eng = FakeEngine(reply="x" * 200, max_model_len=1000, step_s=0.01)
        sent = await _drive_and_disconnect(build_app(eng, "fake-model"), {**CHAT, "stream": True}, after_bodies=5)
        assert sent[0]["status"] == 200
        assert eng.running == set() and len(eng.aborted) == 1
    run(go())


def test_client_disconnect_while_waiting_for_non_streamed_reply_aborts():
    async def go():
        eng = FakeEngine(reply="x" * 200, max_model_len=1000, step_s=0.01)
        await _drive_and_disconnect(build_app(eng, "fake-model"), CHAT, after_bodies=-1, after_s=0.2)
        assert eng.running == set() and len(eng.aborted) == 1
    run(go())


def test_engine_failure_mid_stream_is_an_error_event():
    class FailsLater(FakeEngine):
        async def generate(self, prompt, params, request_id):
            agen = super().generate(prompt, params, request_id)
            yield await agen.__anext__()
            await agen.aclose()
            raise RuntimeError("engine step failed: boom")

    async def go():
        async with client_for(FailsLater()) as c:
            r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
            assert r.status_code == 200
            ev = sse_events(r.text)
            assert ev[-1] == "[DONE]" and set(ev[-2]) == {"error"}
            assert ev[-2]["error"]["type"] == "server_error" and "Traceback" not in r.text
    run(go())


def test_metrics_exposition():
    async def go():
        async with client_for(FakeEngine(reply="abcd")) as c:
            await c.post("/v1/chat/completions", json=CHAT)
            await c.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
            text = (await c.get("/metrics")).text
            for name in [
                'shoal_http_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0',
                'shoal_http_requests_total{endpoint="/v1/chat/completions",status="404"} 1.0',
                "shoal_num_requests_running", "shoal_num_requests_waiting", "shoal_kv_cache_usage_ratio",
                "shoal_kv_cache_blocks_used", 'shoal_prefix_cache_hit_rate{model_name="fake-model"} 0.5',
                "shoal_time_to_first_token_seconds_bucket", "shoal_inter_token_latency_seconds_count",
                "shoal_e2e_request_latency_seconds_sum", "shoal_prompt_tokens_total", "shoal_generation_tokens_total",
                'shoal_request_finished_total{finish_reason="stop",model_name="fake-model"} 1.0',
                'shoal_num_preemptions_total{model_name="fake-model"} 3.0',
            ]:
                assert name in text, name
            assert 'shoal_inter_token_latency_seconds_count{model_name="fake-model"} 3.0' in text
    run(go())
