"""The FastAPI app: `build_app(engine, served_model_name, ...)` and `run_server(args)`.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET /health,
GET /metrics. In front of the routes sits `Guard`, a plain ASGI middleware that checks the API key (401), caps the
body before anything parses it (413; Content-Length and the bytes actually received), counts every
response by status for /metrics and writes one log line per request.

`run_server` loads the model, then runs uvicorn; SIGTERM/SIGINT stop the listener, let in-flight
requests finish for up to `--shutdown-timeout` seconds (then abort them), and shut the engine down.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hmac
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal import __version__
from shoal.server.errors import APIError, error_bytes, install_error_handlers
from shoal.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from shoal.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

log = logging.getLogger("shoal.server")

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
# a body over the limit is read and dropped up to this much, so the client sees the 413 instead of
# a connection reset; beyond it the connection is just answered and closed
_DRAIN_LIMIT = 64 * 2**20
_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


@dataclass
class ServerState:
    engine: Any
    model_names: list[str]
    metrics: ServerMetrics
    reasoning: bool
    allow_request_chat_template: bool = False
    created: int = 0

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_names}",
                           param="model", code="model_not_found")


def detect_reasoning(engine: Any) -> bool:
    """A model reasons when its template or vocabulary knows `<think>` (DeepSeek-R1 and distills)."""
    tok = engine.tokenizer
    template = getattr(tok, "chat_template", None) or ""
    if "<think>" in template:
        return True
    to_id = getattr(tok, "token_to_id", None)
    return bool(to_id and to_id("<think>") is not None and to_id("</think>") is not None)


class Guard:
    """ASGI layer under the app: API key, body cap, status counting, access log."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        path, method = scope["path"], scope["method"]
        endpoint = path if path in _ENDPOINTS else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status = [0]

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                self.metrics.count(endpoint, status[0])
            await send(message)

        try:
            await self._handle(scope, receive, counted_send)
        except Exception:
            if not status[0]:  # the 500 is sent by Starlette's outermost layer
                status[0] = 500
                self.metrics.count(endpoint, 500)
            raise
        finally:
            log.info('%s "%s %s" %s %.3fs', _client(scope), method, path, status[0] or "-", time.monotonic() - t0)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"].startswith("/v1"):
            auth = headers.get("authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                await _send_error(send, 401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                  code="invalid_api_key", extra=[(b"www-authenticate", b"Bearer")])
                return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = headers.get("content-length")
        try:
            declared_len = int(declared) if declared is not None else None
        except ValueError:
            await _send_error(send, 400, "invalid Content-Length header")
            return
        too_big = f"request body exceeds the server's limit of {self.max_body} bytes"
        if declared_len is not None and declared_len > self.max_body:
            if declared_len <= _DRAIN_LIMIT:
                await _drain(receive, _DRAIN_LIMIT)
            await _send_error(send, 413, too_big, code="request_too_large")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            more = message.get("more_body", False)
            if size > self.max_body:
                if more:
                    await _drain(receive, _DRAIN_LIMIT - size)
                await _send_error(send, 413, too_big, code="request_too_large")
                return
            chunks.append(body)
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive() -> Message:
            if replay:
                return replay.pop()
            return await receive()

        await self.app(scope, replay_receive, send)


async def _drain(receive: Receive, limit: int) -> None:
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _send_error(send: Send, status: int, message: str, code: str | None = None,
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_bytes(status, message, code=code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _client(scope: Scope) -> str:
    c = scope.get("client")
    return f"{c[0]}:{c[1]}" if c else "-"


def build_app(
    engine: Any,
    served_model_name: str | list[str],
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    reasoning: bool | None = None,
    allow_request_chat_template: bool = False,
) -> FastAPI:
    """The OpenAI-compatible app around an AsyncEngine-like object (`generate`, `abort`, `stats`,
    `tokenizer`, `max_model_len`). `reasoning=None` detects a `<think>` model."""
    from shoal.server.chat import create_chat_completion
    from shoal.server.completions import create_completion

    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    metrics = ServerMetrics(engine.stats, names[0])
    state = ServerState(
        engine=engine,
        model_names=names,
        metrics=metrics,
        reasoning=detect_reasoning(engine) if reasoning is None else reasoning,
        allow_request_chat_template=allow_request_chat_template,
        created=int(time.time()),
    )
    app = FastAPI(title="shoal", version=__version__, docs_url=None, redoc_url=None)
    app.state.shoal = state
    install_error_handlers(app)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        req = ChatCompletionRequest.model_validate_json(await request.body() or b"null")
        return await create_chat_completion(state, req, request)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        req = CompletionRequest.model_validate_json(await request.body() or b"null")
        return await create_completion(state, req, request)

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, created=state.created, max_model_len=getattr(engine, "max_model_len", None))

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(ModelList(data=[card(n) for n in names]).model_dump(mode="json"))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        state.check_model(model_id)
        return JSONResponse(card(model_id).model_dump(mode="json"))

    @app.get("/health")
    async def health() -> JSONResponse:
        thread = getattr(engine, "_thread", None)
        if thread is not None and not thread.is_alive():
            raise APIError(503, "the engine loop has stopped", code="engine_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Guard, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


def run_server(args: argparse.Namespace) -> int:
    """`shoal serve`: load the model, serve until SIGTERM/SIGINT, drain, shut the engine down."""
    import uvicorn

    from shoal.engine.async_engine import AsyncEngine
    from shoal.engine.llm import engine_config

    opts = _engine_options(args)
    engine = AsyncEngine.from_config(engine_config(args.model, **opts))
    try:
        names = args.served_model_name or [engine.engine.source.name]
        reasoning = {"auto": None, "deepseek_r1": True, "none": False}[args.reasoning_parser]
        app = build_app(
            engine, names, api_key=args.api_key, max_body_bytes=args.max_body_bytes, reasoning=reasoning,
            allow_request_chat_template=args.allow_request_chat_template,
        )
        # what start-up built (model, tokenizer, compiled graphs: ~0.8M objects with the default model,
        # eager) lives as long as the server: keep it out of the cyclic collector, whose full pass over
        # it took ~0.5 s here, a stall for every request in flight
        gc.collect()
        gc.freeze()
        if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level="info", access_log=False,
            timeout_graceful_shutdown=args.shutdown_timeout, timeout_keep_alive=5, lifespan="off",
        )
        log.info("shoal %s serving %s on http://%s:%d (OpenAI API under /v1)", __version__, names[0], args.host,
                 args.port)
        _GracefulServer(config).run()
    finally:
        engine.shutdown()
    return 0


def _graceful_server_class() -> type:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown, which kills the process before the
        engine is shut down; this one returns instead, so `shoal serve` exits 0 after draining."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            previous = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return GracefulServer


def _GracefulServer(config: Any) -> Any:  # noqa: N802 - reads as a class at the call site
    return _graceful_server_class()(config)


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    from shoal.cli import engine_options

    opts = engine_options(args)
    if getattr(args, "max_waiting", None) is not None:
        opts["max_waiting"] = args.max_waiting
    return opts
