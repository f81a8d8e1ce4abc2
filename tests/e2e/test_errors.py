"""Every error a client can cause, over real HTTP: status code and OpenAI's body shape
(`{"error": {"message", "type", "param", "code"}}`), never a traceback."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.timeout(900)

MODEL = "SmolLM2-135M-Instruct"
MSGS = [{"role": "user", "content": "hi"}]


def check(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"]
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert "Traceback" not in r.text and 'File "' not in r.text
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize("extra,param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": "two"}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
])
def test_invalid_parameters_400(default_server: Server, extra: dict, param: str):
    r = httpx.post(f"{default_server.url}/v1/chat/completions", json={"model": MODEL, "messages": MSGS, **extra},
                   timeout=60)
    err = check(r, 400, param=param)
    assert err["type"] == "invalid_request_error"


def test_malformed_json_400(default_server: Server):
    r = httpx.post(f"{default_server.url}/v1/completions", content=b'{"prompt": ', timeout=60,
                   headers={"Content-Type": "application/json"})
    check(r, 400)


def test_prompt_longer_than_context_400(default_server: Server):
    prompt = "hello " * 1500  # > --max-model-len 1024 tokens
    r = httpx.post(f"{default_server.url}/v1/completions", json={"model": MODEL, "prompt": prompt}, timeout=60)
    check(r, 400, param="prompt", code="context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as e:
        default_server.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True)
    assert e.value.code == "context_length_exceeded"


def test_unknown_model_404(default_server: Server):
    with pytest.raises(openai.NotFoundError) as e:
        default_server.client().chat.completions.create(model="gpt-17", messages=MSGS, max_tokens=2)
    assert e.value.code == "model_not_found"
    check(httpx.post(f"{default_server.url}/v1/completions", json={"model": "nope", "prompt": "a"}, timeout=60), 404,
          param="model")
    check(httpx.get(f"{default_server.url}/v1/nothing-here", timeout=60), 404)


def test_body_too_large_413(default_server: Server):
    big = {"model": MODEL, "prompt": "x" * 400_000}  # server runs with --max-body-bytes 256KiB
    check(httpx.post(f"{default_server.url}/v1/completions", json=big, timeout=60), 413)

    def chunked():  # no Content-Length: the limit applies to the bytes that arrive
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 10_000
        yield b'"}'

    check(httpx.post(f"{default_server.url}/v1/completions", content=chunked(), timeout=60), 413)
    assert httpx.get(f"{default_server.url}/health", timeout=60).status_code == 200


def test_api_key_401(locked_server: Server):
    url = f"{locked_server.url}/v1/chat/completions"
    body = {"model": "tiny-locked", "messages": MSGS}
    check(httpx.post(url, json=body, timeout=60), 401, code="invalid_api_key")
    check(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong-key"}, timeout=60), 401)
    check(httpx.get(f"{locked_server.url}/v1/models", headers={"Authorization": "Basic dGVzdA=="}, timeout=60), 401)
    r = httpx.get(f"{locked_server.url}/v1/models", headers={"Authorization": "Bearer test-key-123"}, timeout=60)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny-locked"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{locked_server.url}/v1", api_key="bad", max_retries=0).models.list()


def test_queue_full_503(locked_server: Server):
    """--max-waiting 0: the waiting queue is always full."""
    client = locked_server.client()
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny-locked", prompt="hello", max_tokens=2)
    assert e.value.status_code == 503
    r = httpx.post(f"{locked_server.url}/v1/completions", json={"prompt": "a", "stream": True}, timeout=60,
                   headers={"Authorization": "Bearer test-key-123"})
    check(r, 503, code="overloaded")


def test_hostile_model_template_refused_by_sandbox(locked_server: Server):
    """The model's own template tries `''.__class__.__mro__`: the Jinja sandbox refuses, the client
    gets a 400, the server keeps serving."""
    r = httpx.post(f"{locked_server.url}/v1/chat/completions", json={"messages": MSGS}, timeout=60,
                   headers={"Authorization": "Bearer test-key-123"})
    err = check(r, 400, code="chat_template_error")
    assert "unsafe" in err["message"] or "SecurityError" in err["message"]
    assert "<class" not in err["message"]
    assert httpx.get(f"{locked_server.url}/health", timeout=60).status_code == 200


def test_hostile_request_template_refused_by_sandbox(reasoning_server: Server):
    r = httpx.post(f"{reasoning_server.url}/v1/chat/completions", timeout=60, json={
        "messages": MSGS, "chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    })
    err = check(r, 400, param="chat_template", code="chat_template_error")
    assert "<class" not in err["message"]  # nothing from Python's internals leaked into the reply
