"""A real server against hostile or careless clients: a poisoned request beside a long stream (the
stream's tokens do not change), a prompt far beyond the context (refused unread), slow and oversized
request heads, a drain that runs out of time (every open request gets a proper error), and a storm
of clients that hang up."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import Server, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MSGS = [{"role": "user", "content": "x"}]
LONG = {"messages": MSGS, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
POISON = [
    {"messages": MSGS, "seed": 2**64, "temperature": 1, "max_tokens": 4},
    {"messages": MSGS, "top_k": 10**30, "max_tokens": 4},
    {"messages": MSGS, "stop_token_ids": [10**9], "min_tokens": 2, "max_tokens": 4},
    {"messages": MSGS, "repetition_penalty": 1e-300, "logprobs": True, "temperature": 1, "max_tokens": 4},
    {"messages": MSGS, "max_tokens": "10"},
    {"messages": MSGS, "n": 128, "logprobs": True, "top_logprobs": 20},
]


@pytest.fixture(scope="module")
def server(tiny_reasoning_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = str(tmp_path_factory.mktemp("server") / "hardening.log")
    s = start_server(["--model", tiny_reasoning_dir, "--kv-cache-memory", "32MiB", "--max-model-len", "1024",
                      "--request-header-timeout", "1", "--max-header-bytes", "8KiB"], log)
    yield s
    s.stop()


def _stream_tokens(url: str, body: dict, started: threading.Event | None = None) -> tuple[str, str | None]:
    text, finish = "", None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                text += (c["delta"].get("content") or "") + (c["delta"].get("reasoning_content") or "")
                finish = c["finish_reason"] or finish
            if started is not None and text:
                started.set()
    return text, finish


def test_poisoned_requests_do_not_touch_a_stream_beside_them(server: Server):
    alone = _stream_tokens(server.url, LONG)
    started, result = threading.Event(), {}
    t = threading.Thread(target=lambda: result.update(out=_stream_tokens(server.url, LONG, started)))
    t.start()
    assert started.wait(120)
    statuses = []
    for body in POISON:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        statuses.append(r.status_code)
        assert r.status_code == 400, (body, r.text)
        assert "Traceback" not in r.text and r.json()["error"]["message"]
    t.join(300)
    assert result["out"] == alone and alone[1] == "length"
    assert "Traceback" not in server.log_tail(400)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_a_prompt_far_beyond_the_context_is_refused_unread(server: Server):
    body = {"prompt": "word " * 2_000_000, "max_tokens": 1}  # 10 MB: over the body limit
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 413
    body = {"prompt": "word " * 1_000_000, "max_tokens": 1}  # 5 MB: under it, far beyond 1,024 tokens
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "characters" in r.json()["error"]["message"]  # refused on its length, not tokenized


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_slow_request_head_is_dropped(server: Server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as idle:
        assert _read_all(idle) == b""  # connected, sent nothing: closed by the server
    with socket.create_connection((host, int(port)), timeout=60) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        assert _read_all(slow) == b""
    with socket.create_connection((host, int(port)), timeout=60) as big:
        big.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 16384 + b"\r\n\r\n")
        assert _read_all(big).startswith(b"HTTP/1.1 431")
    with socket.create_connection((host, int(port)), timeout=60) as dribble:
        dribble.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 16384)  # no end of head yet
        assert _read_all(dribble).startswith(b"HTTP/1.1 400")
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_content_length_and_transfer_encoding_together_are_refused(server: Server):
    host, port = server.url.removeprefix("http://").split(":")
    body = b'{"prompt": "x", "max_tokens": 1}'
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 400") and b"Transfer-Encoding" in reply


def test_disconnect_storm_frees_everything(server: Server):
    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {**LONG, "max_tokens": 200, "messages": [{"role": "user", "content": f"storm {i}"}]}
        async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return  # hang up after the first event

    async def storm() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(*(one(client, i) for i in range(40)))

    asyncio.run(storm())
    for _ in range(600):
        m = server.metrics()
        if m["shoal_num_requests_running"] == 0 and m["shoal_kv_cache_blocks_used"] == 0:
            break
        threading.Event().wait(0.1)
    assert m["shoal_num_requests_running"] == 0 and m["shoal_kv_cache_blocks_used"] == 0
    assert "shoal_num_preemptions_total" in m


def test_a_drain_past_its_timeout_ends_every_request_properly(tiny_reasoning_dir: str, tmp_path):
    """--shutdown-timeout 0: at SIGTERM the open stream gets an error event and [DONE], the waiting
    non-streamed request a 503, and the process exits 0 without a traceback."""
    server = start_server(["--model", tiny_reasoning_dir, "--kv-cache-memory", "32MiB", "--shutdown-timeout", "0"],
                          str(tmp_path / "server.log"))
    try:
        long = {"messages": MSGS, "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
        plain: dict = {}
        t = threading.Thread(target=lambda: plain.update(r=httpx.post(f"{server.url}/v1/chat/completions",
                                                                      json=long, timeout=300)))
        events = []
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**long, "stream": True},
                          timeout=300) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    break
            t.start()
            threading.Event().wait(0.5)
            server.proc.send_signal(signal.SIGTERM)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        t.join(120)
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == "shutting_down" and "--shutdown-timeout" in err["message"]
        assert plain["r"].status_code == 503 and plain["r"].json()["error"]["code"] == "shutting_down"
        assert server.proc.wait(timeout=60) == 0
        assert "Traceback" not in server.log_tail(400)
    finally:
        server.stop()


@pytest.mark.parametrize("template, why", [
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{{ range(10**9) | list }}", "OverflowError"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "time limit"),
    ("{{ 'x' * 10**9 }}", "limit"),
    ("{% for m in messages %}", "TemplateSyntaxError"),
])
def test_template_bombs_are_400_and_bounded(reasoning_server: Server, template: str, why: str):
    """A request's own template (the server allows them) that fails or would take the machine gets a
    400 naming why; the server stays healthy."""
    body = {"model": "tiny-r1", "messages": MSGS, "max_tokens": 2, "chat_template": template}
    r = httpx.post(f"{reasoning_server.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "chat_template_error" and why in err["message"], err
    ok = httpx.post(f"{reasoning_server.url}/v1/chat/completions", timeout=120, json={
        **body, "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})
    assert ok.status_code == 200
    assert httpx.get(f"{reasoning_server.url}/health", timeout=10).status_code == 200
