"""`POST /v1/completions`, and the request plumbing the chat endpoint shares.

The path of one request: validate → SamplingParams → `engine.generate` for each prompt → await the
first output of each (the engine raises validation errors, `PromptTooLong` and `EngineOverloaded`
there, so the status is known before any header is sent) → either collect to the end, or stream
Server-Sent Events. Both paths race the client's `http.disconnect`: a client that leaves aborts its
requests, and the engine frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from shoal.engine.async_engine import EngineDeadError
from shoal.engine.llm_engine import EngineOverloaded, PromptTooLong
from shoal.engine.outputs import RequestFailed, RequestOutput, TokenLogprob
from shoal.sampling_params import SamplingParams
from shoal.server.errors import APIError, bad_request
from shoal.server.limits import check_logprobs, check_shape, tokenize
from shoal.server.metrics import RequestTimer
from shoal.server.protocol import (
    LOGPROB_FLOOR,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    SamplingFields,
    Usage,
    now,
    random_id,
)

log = logging.getLogger("shoal.server")
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


# ---------------------------------------------------------------------------- request → engine
def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """Request fields → SamplingParams; a value the engine refuses is a 400 naming the field."""
    try:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=req.stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens,
        )
    except ValueError as e:
        raise bad_request(str(e), param=getattr(e, "param", None)) from None


def engine_error(exc: BaseException, prompt_param: str | None) -> APIError:
    """What the engine raised → the OpenAI error the client gets."""
    if isinstance(exc, EngineOverloaded):
        return APIError(503, f"the server is overloaded ({exc}); retry later", code="overloaded", retry_after=1)
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the server is shutting down ({exc})", code="shutting_down", retry_after=5)
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptTooLong):
        return bad_request(str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, RequestFailed):
        if exc.client_error:
            return bad_request(str(exc), param=exc.param, code="invalid_sampling")
        log.error("request failed: %s", exc)
        return APIError(500, "generation failed for this request; see the server log", code="internal_error")
    if isinstance(exc, ValueError):
        return bad_request(str(exc), param=getattr(exc, "param", None) or prompt_param)
    log.error("generation failed: %s: %s", type(exc).__name__, exc)
    return APIError(500, "generation failed; see the server log", code="internal_error")


@dataclass
class Run:
    """One engine request (one prompt, n samples) and its latest cumulative output."""

    request_id: str
    gen: AsyncIterator[RequestOutput]
    timer: RequestTimer
    out: RequestOutput | None = None
    done: bool = False


@dataclass
class Job:
    """All the engine requests behind one HTTP request."""

    state: Any
    runs: list[Run] = field(default_factory=list)

    async def start(self, prompts: list[Any], params: SamplingParams, base_id: str, prompt_param: str) -> None:
        eng = self.state.engine
        for i, p in enumerate(prompts):
            rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
            self.runs.append(Run(rid, eng.generate(p, params, rid), self.state.metrics.timer()))
        results = await asyncio.gather(*(r.gen.__anext__() for r in self.runs), return_exceptions=True)
        for r, res in zip(self.runs, results):
            if isinstance(res, BaseException):
                await self.close()
                if isinstance(res, StopAsyncIteration):
                    raise APIError(500, "the engine returned no output", code="internal_error")
                if isinstance(res, asyncio.CancelledError):
                    raise res
                raise engine_error(res, prompt_param) from None
            self._update(r, res)

    def _update(self, r: Run, out: RequestOutput) -> None:
        r.out = out
        r.timer.update(out)
        if out.finished:
            r.done = True
            r.timer.finish([c.finish_reason for c in out.outputs])

    async def updates(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(run index, cumulative output) as each arrives after the first ones."""
        live = [i for i, r in enumerate(self.runs) if not r.done]
        if len(live) == 1:
            r = self.runs[live[0]]
            async for out in r.gen:
                self._update(r, out)
                yield live[0], out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for out in self.runs[i].gen:
                    queue.put_nowait((i, out))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((i, e))
            queue.put_nowait((i, None))

        tasks = [asyncio.ensure_future(pump(i)) for i in live]
        try:
            pending = len(tasks)
            while pending:
                i, item = await queue.get()
                if item is None:
                    pending -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                self._update(self.runs[i], item)
                yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def collect(self) -> list[RequestOutput]:
        async for _ in self.updates():
            pass
        return [r.out for r in self.runs]  # type: ignore[misc]

    async def close(self) -> None:
        """Abort whatever has not finished (idempotent; safe in a cancelled task)."""
        for r in self.runs:
            if not r.done:
                self.state.engine.abort(r.request_id)
                if r.out is not None:
                    r.timer.finish(["abort"] * len(r.out.outputs))
                r.done = True
        for r in self.runs:
            try:
                await r.gen.aclose()
            except (Exception, asyncio.CancelledError):  # noqa: BLE001 - closing only
                pass

    def usage(self) -> Usage:
        prompt = sum(len(r.out.prompt_token_ids) for r in self.runs if r.out)
        gen = sum(len(c.token_ids) for r in self.runs if r.out for c in r.out.outputs)
        cached = sum(r.out.metrics.num_cached_tokens for r in self.runs if r.out and r.out.metrics)
        return Usage(
            prompt_tokens=prompt, completion_tokens=gen, total_tokens=prompt + gen,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )


async def until_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected()


async def respond(request: Request, job: Job, endpoint: str, produce: Awaitable[Response]) -> Response:
    """Runs a non-streaming job or the start of a streaming one; a vanished client aborts it."""
    try:
        return await race_disconnect(request, produce)
    except ClientDisconnected:
        log.info("%s: client disconnected; aborted %s", endpoint, ", ".join(r.request_id for r in job.runs))
        await job.close()
        return Response(status_code=499)
    except Exception as exc:  # noqa: BLE001 - what the engine raised becomes the client's error
        await job.close()
        raise engine_error(exc, "messages" if endpoint == "chat" else "prompt") from None
    except BaseException:
        await job.close()
        raise


# ---------------------------------------------------------------------------- SSE
def sse(payload: BaseModel | dict, exclude: set[str] | None = None) -> str:
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json(exclude=exclude)
    else:
        text = json.dumps(payload)
    return f"data: {text}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """SSE whose producer is cancelled when the client disconnects, whatever ASGI spec version the
    server speaks (Starlette only listens for `http.disconnect` below spec 2.4)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], headers: dict[str, str] | None = None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        stream = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(listen())
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stream, watch):
                t.cancel()
            await asyncio.gather(stream, watch, return_exceptions=True)
        if stream.done() and not stream.cancelled() and stream.exception() is not None:
            exc = stream.exception()
            if not isinstance(exc, OSError):
                raise exc  # type: ignore[misc]


async def guarded_stream(job: Job, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Wraps an SSE producer: a failure mid-stream becomes an error event, never a traceback, and
    the job is aborted however the stream ends."""
    try:
        async for e in events:
            yield e
    except Exception as exc:  # noqa: BLE001 - the client gets an error event, the log the traceback
        if not isinstance(exc, (APIError, RequestFailed, EngineDeadError)):
            log.exception("stream failed")
        yield f"data: {json.dumps(engine_error(exc, None).body())}\n\n"
        yield SSE_DONE
    finally:
        await job.close()


# ---------------------------------------------------------------------------- logprobs
def _lp(v: float) -> float:
    """A logprob JSON can carry: -inf (a masked token) and NaN become the floor, +inf cannot occur."""
    v = float(v)
    return v if v > LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN compares false: the floor


def completion_logprobs(lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for t in lps:
        out.tokens.append(t.token)
        out.token_logprobs.append(_lp(t.logprob))
        out.top_logprobs.append({tok: _lp(v) for _, tok, v in t.top} if t.top else None)
        out.text_offset.append(offset)
        offset += len(t.token)
    return out


# ---------------------------------------------------------------------------- /v1/completions
async def create_completion(state: Any, req: CompletionRequest, request: Request) -> Response:
    state.check_model(req.model)
    params = sampling_params(req, req.max_tokens, req.logprobs)
    raw = req.prompts()
    check_shape(state, req.n, len(raw))
    texts = [p for p in raw if isinstance(p, str)]
    encoded = iter(await tokenize(state, texts, "prompt")) if texts else iter(())
    prompts: list[dict[str, Any]] = [
        {"prompt_token_ids": next(encoded), "prompt": p} if isinstance(p, str) else {"prompt_token_ids": p} for p in raw
    ]
    check_logprobs(state, req.logprobs, req.n, [len(p["prompt_token_ids"]) for p in prompts], req.max_tokens)
    rid = random_id("cmpl")
    model = state.model_name
    job = Job(state)
    created = now()

    def echo_text(i: int) -> str:
        if not req.echo:
            return ""
        p = raw[i]
        return p if isinstance(p, str) else state.engine.tokenizer.decode(p)

    if not req.stream:
        async def produce() -> Response:
            await job.start(prompts, params, rid, "prompt")
            outs = await job.collect()
            choices = []
            for i, out in enumerate(outs):
                prefix = echo_text(i)
                for c in out.outputs:
                    choices.append(CompletionChoice(
                        index=i * req.n + c.index,
                        text=prefix + c.text,
                        logprobs=completion_logprobs(c.logprobs, len(prefix)) if c.logprobs is not None else None,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    ))
            body = CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=job.usage())
            return JSONResponse(body.model_dump(mode="json"))

        return await respond(request, job, "completions", produce())

    async def events() -> AsyncIterator[str]:
        sent: dict[tuple[int, int], tuple[int, int, bool]] = {}  # (run, choice) → chars, tokens, finished
        exclude = None if req.include_usage else {"usage"}

        def chunk(choices: list[CompletionChoice]) -> str:
            return sse(CompletionResponse(id=rid, created=created, model=model, choices=choices), exclude)

        def deltas(i: int, out: RequestOutput) -> list[str]:
            chunks = []
            for c in out.outputs:
                chars, toks, fin = sent.get((i, c.index), (0, 0, False))
                if fin:
                    continue
                text = c.text[chars:]
                if chars == 0 and req.echo:
                    text = echo_text(i) + text
                lps = completion_logprobs(c.logprobs[toks:], chars) if c.logprobs is not None else None
                if text or lps and lps.tokens or c.finished:
                    chunks.append(chunk([CompletionChoice(
                        index=i * req.n + c.index, text=text, logprobs=lps, finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )]))
                sent[(i, c.index)] = (max(chars, len(c.text)), len(c.logprobs or ()), c.finished)
            return chunks

        for i, r in enumerate(job.runs):
            for e in deltas(i, r.out):  # type: ignore[arg-type]
                yield e
        async for i, out in job.updates():
            for e in deltas(i, out):
                yield e
        if req.include_usage:
            yield sse(CompletionResponse(id=rid, created=created, model=model, choices=[], usage=job.usage()))
        yield SSE_DONE

    async def start_stream() -> Response:
        await job.start(prompts, params, rid, "prompt")
        return EventStream(guarded_stream(job, events()), headers={"X-Request-Id": rid})

    return await respond(request, job, "completions", start_stream())

