"""The served OpenAPI document (`/openapi.json`), written from the wire models in `protocol.py`.

The POST handlers read the raw body themselves (so a bad request is shoal's 400 naming the field,
not FastAPI's 422), which leaves FastAPI nothing to describe. This module states what the server
really does instead: the request bodies (pydantic's validation schemas), every status each route
sends with its body (the OpenAI error shape for all of them), the content types, and the bearer
scheme. Schemathesis fuzzes the server against this document (`tests/e2e/test_fuzz.py`), so a
status or a schema that drifts from the code fails there.

The document is built on first use and cached; it follows the server's settings where they change
what a request may contain (`chat_template` only with `--allow-request-chat-template`, `n` up to
`--max-n`). What JSON Schema cannot say is in the descriptions: limits of the model (its context, its
vocabulary) and comparisons between fields (`best_of` = `n`, `min_tokens` ≤ `max_tokens`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from shoal.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)

Schema = dict[str, Any]
REF = "#/components/schemas/{model}"
JSON = "application/json"

_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (ChatCompletionRequest, "validation"),
    (CompletionRequest, "validation"),
    (ChatCompletionResponse, "serialization"),
    (ChatCompletionChunk, "serialization"),
    (CompletionResponse, "serialization"),
    (ModelList, "serialization"),
    (ModelCard, "serialization"),
    (ErrorResponse, "serialization"),
]

_ERRORS = {
    400: "The request is invalid: not JSON, a field of the wrong type or out of range, a combination shoal "
         "refuses, a prompt that does not fit the model's context (`code: context_length_exceeded`) or a "
         "limit of the model (`top_k` and token ids beyond its vocabulary). `param` names the field.",
    401: "Missing or wrong API key (only when the server runs with `--api-key`).",
    404: "The `model` is not one this server serves (`code: model_not_found`).",
    408: "The request body did not arrive in time (`--request-body-timeout`).",
    413: "The request body is larger than the server's `--max-body-bytes`.",
    431: "The request line and headers are larger than the server's `--max-header-bytes`.",
    500: "An unexpected failure; the details are in the server log, never in the response.",
    503: "The waiting queue is full (`code: overloaded`; retry later) or the server is shutting down.",
}

_AUTH = [{"bearerAuth": []}]
_SECURITY_SCHEMES = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <key>` on every `/v1` route. Enforced only when the server "
                       "runs with `--api-key` (or `SHOAL_API_KEY`); without one, `/v1` is open.",
    },
}


def install_openapi(app: FastAPI) -> None:
    """Serve `openapi_document` (built once, on the first request for it) as the app's document."""

    def openapi() -> Schema:
        if app.openapi_schema is None:
            state = getattr(app.state, "shoal", None)
            app.openapi_schema = openapi_document(
                app.title, app.version,
                allow_request_chat_template=bool(getattr(state, "allow_request_chat_template", False)),
                max_n=getattr(getattr(state, "limits", None), "max_n", None),
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def openapi_document(title: str, version: str, *, allow_request_chat_template: bool = False,
                     max_n: int | None = None) -> Schema:
    """The OpenAPI 3.1 document of the routes `build_app` serves, with the server's own limits:
    `chat_template` only where the server accepts it, `n` (and `best_of`, which must equal it) up
    to `--max-n`."""
    schemas = component_schemas()
    if not allow_request_chat_template:
        schemas["ChatCompletionRequest"]["properties"]["chat_template"] = {
            "type": "null",
            "description": "Refused by this server (it runs without `--allow-request-chat-template`).",
        }
    if max_n is not None:
        for request in ("ChatCompletionRequest", "CompletionRequest"):
            _cap(schemas[request]["properties"]["n"], max_n)
        _cap(schemas["CompletionRequest"]["properties"]["best_of"], max_n)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "OpenAI-compatible API of the shoal inference engine. Unknown request fields are "
                           "ignored; known ones are strictly typed (no string-to-number coercion, no NaN).",
        },
        "paths": {
            "/v1/chat/completions": {"post": _generate(
                "createChatCompletion", "Chat completion: messages through the model's chat template",
                "ChatCompletionRequest", "ChatCompletionResponse", "ChatCompletionChunk",
            )},
            "/v1/completions": {"post": _generate(
                "createCompletion", "Text completion of one or more prompts (text or token ids)",
                "CompletionRequest", "CompletionResponse", "CompletionResponse",
            )},
            "/v1/models": {"get": _get("listModels", "The served model names", _json(_ref("ModelList")), 401, 431)},
            "/v1/models/{model_id}": {"get": {
                **_get("retrieveModel", "One served model", _json(_ref("ModelCard")), 401, 404, 431),
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            }},
            "/health": {"get": _get("health", "Liveness: 503 once the engine loop has stopped", _json({
                "type": "object",
                "properties": {"status": {"const": "ok"}},
                "required": ["status"],
                "additionalProperties": False,
            }), 431, 503, auth=False)},
            "/metrics": {"get": _get("metrics", "Prometheus metrics (text exposition format)",
                                     {"text/plain": {"schema": {"type": "string"}}}, 431, auth=False)},
        },
        "components": {"schemas": schemas, "securitySchemes": _SECURITY_SCHEMES},
    }


def _cap(schema: Schema, maximum: int) -> None:
    """Lower the `maximum` of an integer schema (or of the integer branch of `integer | null`)."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "integer":
            branch["maximum"] = min(branch.get("maximum", maximum), maximum)


def component_schemas() -> dict[str, Schema]:
    """Every wire model's JSON schema, referenced as `#/components/schemas/<Model>`: requests as
    they validate, responses as they serialize."""
    refs, top = models_json_schema(_MODELS, ref_template=REF)
    for (model, mode), ref in refs.items():
        # pydantic renames a model used in both modes with two schemas (`-Input`/`-Output`)
        if ref != _ref(model.__name__):
            raise RuntimeError(f"{model.__name__} ({mode}) is published as {ref['$ref']}; give it one schema")
    return dict(top.get("$defs", {}))


def _ref(name: str) -> Schema:
    return {"$ref": REF.format(model=name)}


def _json(schema: Schema) -> Schema:
    return {JSON: {"schema": schema}}


def _errors(*statuses: int) -> Schema:
    out: Schema = {}
    for status in statuses:
        response: Schema = {"description": _ERRORS[status], "content": _json(_ref("ErrorResponse"))}
        if status == 401:
            response["headers"] = {"WWW-Authenticate": {"required": True, "schema": {"const": "Bearer"}}}
        if status == 503:
            response["headers"] = {"Retry-After": {
                "description": "Seconds to wait before retrying (when the server expects to recover).",
                "schema": {"type": "integer", "minimum": 0},
            }}
        out[str(status)] = response
    return out


def _get(operation_id: str, summary: str, content: Schema, *errors: int, auth: bool = True) -> Schema:
    op: Schema = {
        "operationId": operation_id,
        "summary": summary,
        "responses": {"200": {"description": summary, "content": content}, **_errors(*errors)},
    }
    if auth:
        op["security"] = _AUTH
    return op


def _event(chunk: str) -> Schema:
    """One Server-Sent Event of a stream: `data` is a JSON chunk, an error, or the final `[DONE]`.
    OpenAPI 3.1 has no schema for the items of a stream; here `schema` describes one event, as
    schemathesis reads it (and as 3.2's `itemSchema` says)."""
    payload = {"anyOf": [_ref(chunk), _ref("ErrorResponse")]}
    return {
        "type": "object",
        "properties": {"data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": JSON, "contentSchema": payload},
        ]}},
        "required": ["data"],
    }


def _generate(operation_id: str, summary: str, request: str, response: str, chunk: str) -> Schema:
    """A generating POST: JSON in; one JSON body, or Server-Sent Events with `stream: true`."""
    ok = (
        f"`application/json`: one `{response}`. With `stream: true`, `text/event-stream`: events "
        f"`data: <{chunk} JSON>`, the last one `data: [DONE]`; a failure after the stream started arrives as "
        "`data: <ErrorResponse JSON>` before `[DONE]`."
    )
    return {
        "operationId": operation_id,
        "summary": summary,
        "security": _AUTH,
        "requestBody": {"required": True, "content": _json(_ref(request))},
        "responses": {
            "200": {
                "description": ok,
                "content": {**_json(_ref(response)), "text/event-stream": {"schema": _event(chunk)}},
            },
            **_errors(400, 401, 404, 408, 413, 431, 500, 503),
        },
    }
