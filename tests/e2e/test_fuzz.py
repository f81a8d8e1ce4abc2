"""Schemathesis against a real server: requests generated from the OpenAPI document shoal serves, valid
and invalid, under every check schemathesis has (no 5xx, documented status codes, content types,
headers and response schemas, SSE events, valid data accepted, invalid data rejected, the API key
enforced, unsupported methods answered 405 with `Allow`), plus one of ours: a stream that started
with 200 ends with `[DONE]` and no error event.

The tests are parametrized from `openapi_document`, the function whose result the server serves:
schemathesis's loader from a pytest fixture (`schemathesis.pytest.from_fixture`, the way to read a
document from a server that a fixture starts) breaks under pytest 9 (it sets `Node._nodeid`).
`test_served_document` proves the served `/openapi.json` is that same document.

Some schema-valid requests are refused on purpose, for reasons JSON Schema cannot state: they depend
on the model (its context, its vocabulary), compare two fields (`min_tokens` ≤ `max_tokens`,
`best_of` = `n`), or write an integer as `1.0` (JSON Schema's integers include it; shoal's strict
models do not). `refused_by_design` recognises exactly those 400s from the request itself.

`test_edge_case` sends, through the same checks, a few schema-valid requests that generators rarely
reach (each found by hand or by an earlier fuzz run).

The stateful checks (`use_after_free`, `ensure_resource_availability`, `object_level_authorization`)
run too but have nothing to act on: this API creates and deletes no resources.
`max_response_time` stays off: a timing assertion would fail on a busy machine, not on a bug.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import positive_data_acceptance
from schemathesis.specs.openapi.definitions import OPENAPI_31

from shoal import __version__
from shoal.server.openapi import openapi_document
from tests.e2e.conftest import Server, start_server

pytestmark = pytest.mark.timeout(600)  # the first test also starts the server

API_KEY = "fuzz-key"
SERVED = "fuzz-model"
CONTEXT = 64  # --max-model-len
MAX_N = 4  # --max-n: keeps each generated request to a few sequences of at most CONTEXT tokens
MAX_LOGPROB_ENTRIES = 2**18  # --max-logprob-entries, the server's default
COMPLETION_MAX_TOKENS = 16  # CompletionRequest.max_tokens's default
MAX_EXAMPLES = 150  # generated cases per operation, after the examples and coverage phases

CONFIG = schemathesis.Config.from_dict({
    "seed": 20240611,
    # `max_tokens`, `stop_token_ids`, `skip_special_tokens` hold "token": repros would mask them as secrets
    "output": {"sanitization": {"enabled": False}},
    "auth": {"openapi": {"bearerAuth": {"bearer": API_KEY}}},
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
    "max-stream-events": 10_000,  # read whole streams (schemathesis stops at 20 events by default)
})
DOCUMENT = openapi_document("shoal", __version__, max_n=MAX_N)
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)

Check = Callable[[Any, schemathesis.Response, schemathesis.Case], bool | None]


@dataclass(frozen=True)
class Model:
    """What the served model refuses beyond the schema: prompts past its context, ids past its vocabulary."""

    context: int
    vocab: int


@pytest.fixture(scope="module")
def model(tiny_reasoning_dir: str) -> Model:
    with open(os.path.join(tiny_reasoning_dir, "config.json"), encoding="utf-8") as f:
        return Model(context=CONTEXT, vocab=json.load(f)["vocab_size"])


@pytest.fixture(scope="module")
def fuzz_server(tiny_reasoning_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = str(tmp_path_factory.mktemp("server") / "fuzz.log")
    s = start_server(["--model", tiny_reasoning_dir, "--served-model-name", SERVED, "--kv-cache-memory", "32MiB",
                      "--max-model-len", str(CONTEXT), "--max-n", str(MAX_N)], log, api_key=API_KEY)
    yield s
    s.stop()


# ---------------------------------------------------------------------------- refusals by design
def _integral_float(value: Any) -> bool:
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, list):
        return any(_integral_float(v) for v in value)
    if isinstance(value, dict):
        return any(_integral_float(v) for v in value.values())
    return False


def _ints(value: Any) -> list[int]:
    """Every integer in a (nested) list: token ids."""
    if isinstance(value, list):
        return [i for v in value for i in _ints(v)]
    return [value] if isinstance(value, int) and not isinstance(value, bool) else []


def _int(body: dict[str, Any], name: str, default: int | None = None) -> int | None:
    value = body.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def refused_by_design(body: Any, response: schemathesis.Response, model: Model) -> str | None:
    """Why shoal refuses this schema-valid request on purpose, or None. Each reason is checked
    against the request wherever the request alone decides it."""
    if response.status_code != 400 or not isinstance(body, dict):
        return None
    try:
        err = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None
    param, code = err.get("param"), err.get("code")
    field = param.split(".")[0] if isinstance(param, str) else None
    chat = "messages" in body
    n = _int(body, "n", 1) or 1
    max_tokens = _int(body, "max_completion_tokens") or _int(body, "max_tokens")
    if not chat and "max_tokens" not in body:
        max_tokens = COMPLETION_MAX_TOKENS
    if code == "context_length_exceeded":
        return "the prompt does not fit the model's context"
    type_error = "valid integer" in err.get("message", "") or (field == "prompt" and param != "prompt")
    if type_error and _integral_float(body.get(field)):  # `prompt.list[int]...`: the union's errors
        return "an integer written as 1.0"
    if field == "best_of" and body.get("best_of") != n:
        return "best_of differs from n"
    if field == "min_tokens" and max_tokens is not None and (_int(body, "min_tokens") or 0) > max_tokens:
        return "min_tokens exceeds max_tokens"
    if field == "top_k" and (_int(body, "top_k", 0) or 0) > model.vocab:
        return "top_k beyond the vocabulary"
    if field in ("stop_token_ids", "prompt") and any(i >= model.vocab for i in _ints(body.get(field))):
        return "a token id beyond the vocabulary"
    if field == "logprobs":
        top = _int(body, "top_logprobs", 0) if chat else _int(body, "logprobs", 0)
        prompts = body.get("prompt")
        batch = isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], (str, list))
        num_prompts = len(prompts) if batch else 1
        most = num_prompts * n * min(max_tokens or model.context, model.context) * (1 + (top or 0))
        if most > MAX_LOGPROB_ENTRIES:
            return "more logprob entries than --max-logprob-entries"
    return None


def positive_data_accepted(model: Model) -> Check:
    """schemathesis's `positive_data_acceptance`, less the refusals `refused_by_design` explains."""

    def check(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
        positive = case.meta is not None and case.meta.generation.mode.is_positive
        if positive and refused_by_design(case.body, response, model):
            return None
        return positive_data_acceptance(ctx, response, case)

    check.__name__ = "positive_data_accepted"
    return check


def streams_end_cleanly(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """A stream's status is sent before its first token, so a failure after that is an error event,
    which no status-code check sees. Every stream must end with one `[DONE]` and carry no error."""
    content_type = response.headers.get("content-type", [""])[0]
    if response.status_code != 200 or not content_type.startswith("text/event-stream"):
        return None
    if response.stream_cut_short:  # the request timeout passed first
        return None
    data = [line.removeprefix("data: ") for line in response.text.split("\n") if line.startswith("data: ")]
    errors = [d for d in data if d != "[DONE]" and "error" in json.loads(d)]
    if errors or not data or data[-1] != "[DONE]" or data.count("[DONE]") != 1:
        raise AssertionError(f"stream failed after its 200: error event {errors[0]}" if errors
                             else f"stream does not end with one [DONE]: last events {data[-3:]!r}")
    return None


# ---------------------------------------------------------------------------- tests
def test_document_is_openapi_31() -> None:
    errors = [str(e) for e in jsonschema_rs.validator_for(OPENAPI_31).iter_errors(DOCUMENT)]
    assert not errors, errors[:3]


@pytest.mark.slow
def test_served_document(fuzz_server: Server) -> None:
    """The served document is the one the fuzz test is generated from, and it declares the request
    bodies FastAPI cannot see (the handlers parse the raw body themselves)."""
    served = httpx.get(f"{fuzz_server.url}/openapi.json", timeout=30).json()
    assert served == DOCUMENT
    for path, model_name in (("/v1/chat/completions", "ChatCompletionRequest"),
                             ("/v1/completions", "CompletionRequest")):
        body = served["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model_name}"}
        assert "properties" in served["components"]["schemas"][model_name]


HI = [{"role": "user", "content": "hi"}]
# schema-valid requests a generator is unlikely to reach: the served model by name, every option of a
# stream at once, template kwargs named like the renderer's own parameters, penalties at the ends of their range
EDGE_CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "model-card": ("GET", "/v1/models/{model_id}", {"path_parameters": {"model_id": SERVED}}),
    "chat-stream-all-options": ("POST", "/v1/chat/completions", {"body": {
        "model": SERVED, "messages": HI, "n": MAX_N, "logprobs": True, "top_logprobs": 20, "stream": True,
        "stream_options": {"include_usage": True}, "stop": ["</think>"], "seed": -1, "ignore_eos": True}}),
    "completion-token-prompts": ("POST", "/v1/completions", {"body": {
        "model": SERVED, "prompt": [[1, 2, 3], [4]], "n": 2, "best_of": 2, "logprobs": 5, "max_tokens": 4}}),
    "chat-template-kwarg-template": ("POST", "/v1/chat/completions", {"body": {
        "messages": HI, "chat_template_kwargs": {"template": "x"}}}),
    "chat-template-kwarg-self": ("POST", "/v1/chat/completions", {"body": {
        "messages": HI, "chat_template_kwargs": {"self": 1}}}),
    "repetition-penalty-smallest": ("POST", "/v1/chat/completions", {"body": {
        "messages": HI, "repetition_penalty": 1e-6, "logprobs": True}}),
    "repetition-penalty-smallest-stream": ("POST", "/v1/completions", {"body": {
        "prompt": "hi", "repetition_penalty": 1e-6, "stream": True}}),
    "repetition-penalty-largest": ("POST", "/v1/completions", {"body": {"prompt": "hi", "repetition_penalty": 1e6}}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_case(fuzz_server: Server, model: Model, name: str) -> None:
    """Each edge case is valid by the document, passes every check, and is accepted (or refused by design)."""
    method, path, parts = EDGE_CASES[name]
    operation = schema[path][method]
    if "body" in parts:
        request = next(iter(DOCUMENT["paths"][path][method.lower()]["requestBody"]["content"].values()))["schema"]
        validator = jsonschema_rs.Draft202012Validator({**request, "components": DOCUMENT["components"]})
        assert validator.is_valid(parts["body"])
    case = operation.Case(**parts, media_type="application/json" if "body" in parts else None)
    response = case.call_and_validate(
        base_url=fuzz_server.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"},
        excluded_checks=[positive_data_acceptance], additional_checks=[streams_end_cleanly],
    )
    assert response.status_code == 200 or refused_by_design(parts.get("body"), response, model), response.text


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES, derandomize=True, deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each step is a request; the repro is exact anyway
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
)
def test_fuzz(fuzz_server: Server, model: Model, case: schemathesis.Case) -> None:
    case.call_and_validate(
        base_url=fuzz_server.url, timeout=60,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[positive_data_accepted(model), streams_end_cleanly],
    )
