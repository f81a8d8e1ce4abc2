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
import asyncio
import contextlib
import gc
import hmac
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal import __version__
from shoal.server.errors import APIError, error_bytes, install_error_handlers
from shoal.server.limits import ServerLimits
from shoal.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from shoal.server.openapi import install_openapi
from shoal.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from shoal.server.template_sandbox import TemplateLimits

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
    limits: ServerLimits = field(default_factory=ServerLimits)

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

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, api_key: str | None, max_body_bytes: int,
                 body_timeout_s: float = ServerLimits.body_timeout_s,
                 max_header_bytes: int = ServerLimits.max_header_bytes) -> None:
        self.app = app
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.max_header_bytes = max_header_bytes

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
            log.info('%s "%s %s" %s %.3fs', _client(scope), method, printable(path), status[0] or "-",
                     time.monotonic() - t0)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("headers", [])
        # h11 caps a head that arrives in pieces (--max-header-bytes); this one arrived whole
        if len(scope.get("raw_path") or b"") + sum(len(k) + len(v) + 4 for k, v in raw) > self.max_header_bytes:
            await _send_error(send, 431, f"request headers exceed the server's limit of {self.max_header_bytes} bytes",
                              code="headers_too_large", extra=[(b"connection", b"close")])
            return
        headers = {k.decode("latin-1").lower(): v for k, v in raw}
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
        if declared is not None and "transfer-encoding" in headers:
            # two framings of one body: a proxy in front may read it the other way (request smuggling)
            await _send_error(send, 400, "a request may not carry both Content-Length and Transfer-Encoding",
                              extra=[(b"connection", b"close")])
            return
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
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                await _send_error(send, 408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                                  code="request_timeout", extra=[(b"connection", b"close")])
                return
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


def printable(text: str, limit: int = 2000) -> str:
    """`text` for a log line: control characters escaped (a newline in a request path must not
    forge a second line) and cut at `limit` characters."""
    if text.isprintable() and len(text) <= limit:
        return text
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


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
    limits: ServerLimits | None = None,
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
        limits=limits or ServerLimits(),
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

    install_openapi(app)
    app.add_middleware(Guard, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes,
                       body_timeout_s=state.limits.body_timeout_s, max_header_bytes=state.limits.max_header_bytes)
    return app


def run_server(args: argparse.Namespace) -> int:
    """`shoal serve`: load the model, serve until SIGTERM/SIGINT, drain, shut the engine down."""
    from shoal.engine.async_engine import AsyncEngine
    from shoal.engine.llm import engine_config
    from shoal.server import template_sandbox

    limits = server_limits(args)  # a bad flag fails before the model loads
    opts = _engine_options(args)
    engine = AsyncEngine.from_config(engine_config(args.model, **opts))
    try:
        names = args.served_model_name or [engine.engine.source.name]
        reasoning = {"auto": None, "deepseek_r1": True, "none": False}[args.reasoning_parser]
        app = build_app(
            engine, names, api_key=args.api_key, max_body_bytes=args.max_body_bytes, reasoning=reasoning,
            allow_request_chat_template=args.allow_request_chat_template, limits=limits,
        )
        # what start-up built (model, tokenizer, compiled graphs: ~0.8M objects with the default model,
        # eager) lives as long as the server: keep it out of the cyclic collector, whose full pass over
        # it took ~0.5 s here, a stall for every request in flight
        gc.collect()
        gc.freeze()
        if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
        log.info("shoal %s serving %s on http://%s:%d (OpenAI API under /v1)", __version__, names[0], args.host,
                 args.port)
        server = make_server(app, args.host, args.port, limits, args.shutdown_timeout,
                             on_drain_timeout=lambda: engine.fail_all(
                                 f"it did not finish within --shutdown-timeout ({args.shutdown_timeout} s)"))
        if args.allow_request_chat_template:
            asyncio.run(template_sandbox.warm_up())
        server.run()
    finally:
        template_sandbox.shutdown()
        engine.shutdown()
    return 0


def server_limits(args: argparse.Namespace) -> ServerLimits:
    try:
        return ServerLimits(
            max_n=args.max_n, max_logprob_entries=args.max_logprob_entries,
            header_timeout_s=args.request_header_timeout, body_timeout_s=args.request_body_timeout,
            max_header_bytes=args.max_header_bytes,
            template=TemplateLimits(timeout_s=args.chat_template_timeout, memory_bytes=args.chat_template_memory,
                                    max_output_chars=args.chat_template_max_chars),
        )
    except ValueError as e:
        raise SystemExit(f"shoal serve: {e}") from None


def make_server(app: ASGIApp, host: str, port: int, limits: ServerLimits, shutdown_timeout: float,
                on_drain_timeout: Callable[[], None]) -> Any:
    """uvicorn, hardened: a deadline on each request head (`limits.header_timeout_s`), a cap on its size
    (`limits.max_header_bytes`), and a drain that ends cleanly. On SIGTERM/SIGINT the listener closes
    at once and requests in flight may finish for `shutdown_timeout` seconds; then
    `on_drain_timeout` ends the rest (each open stream gets an error event and `[DONE]`, each waiting
    client a 503), and the process exits 0 once they are sent."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", access_log=False, lifespan="off",
        # uvicorn's own deadline, only a backstop: by then every stream has been ended by on_drain_timeout
        timeout_graceful_shutdown=shutdown_timeout + 10, timeout_keep_alive=5,
        h11_max_incomplete_event_size=limits.max_header_bytes, http=_timed_h11(limits.header_timeout_s),
    )
    return _graceful_server_class()(config, shutdown_timeout, on_drain_timeout)


def _timed_h11(header_timeout_s: float) -> type:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        """uvicorn's h11 protocol with a deadline on each request head. uvicorn has none: a client
        that connects and sends nothing, or dribbles its headers (slowloris), would hold its
        connection for ever. The deadline runs from the connection, or from the previous response,
        until a whole request head has arrived; then the connection is closed."""

        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._arm()  # a pipelined request already buffered disarms it at once
            super().on_response_complete()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self.transport.is_closing():
                log.info("%s: closed a connection that sent no complete request head in %g s",
                         "%s:%d" % self.client if self.client else "-", header_timeout_s)
                self.transport.close()

    return TimedH11Protocol


def _graceful_server_class() -> type:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown, which kills the process before the
        engine is shut down; this one returns instead, so `shoal serve` exits 0 after draining. And
        where uvicorn cancels whatever is still running at its deadline (clients see a truncated
        stream, the log tracebacks), this one first asks the app to end them properly."""

        def __init__(self, config: Any, drain_s: float, on_drain_timeout: Callable[[], None]) -> None:
            super().__init__(config)
            self.drain_s = drain_s
            self.on_drain_timeout = on_drain_timeout

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

        async def shutdown(self, sockets: Any = None) -> None:
            deadline = asyncio.get_running_loop().call_later(self.drain_s, self._drain_timeout)
            try:
                await super().shutdown(sockets)
            finally:
                deadline.cancel()

        def _drain_timeout(self) -> None:
            log.warning("shutdown: requests still running after %g s; ending them", self.drain_s)
            self.on_drain_timeout()

    return GracefulServer


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    from shoal.engine.args import engine_options

    opts = engine_options(args)
    if getattr(args, "max_waiting", None) is not None:
        opts["max_waiting"] = args.max_waiting
    return opts
