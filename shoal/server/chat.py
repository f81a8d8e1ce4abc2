"""`POST /v1/chat/completions`: messages → the model's own chat template (sandboxed Jinja) → tokens →
the engine; the output goes back as one `chat.completion` or as `chat.completion.chunk` events.

For reasoning models the text between `<think>` and `</think>` is returned as `reasoning_content`
(in messages and in stream deltas) and the rest as `content`; a template that ends the prompt with
an open `<think>` starts the parser inside the thought.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shoal.engine.outputs import CompletionOutput, TokenLogprob
from shoal.server.completions import (
    SSE_DONE,
    EventStream,
    Job,
    _lp,
    guarded_stream,
    respond,
    sampling_params,
    sse,
)
from shoal.server.errors import bad_request
from shoal.server.limits import check_logprobs, check_shape, tokenize
from shoal.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    FieldError,
    TopLogprob,
    now,
    random_id,
)
from shoal.server.reasoning import ReasoningParser, prompt_opens_thinking

log = logging.getLogger("shoal.server")
RESERVED_TEMPLATE_ARGS = ("messages", "add_generation_prompt", "bos_token", "eos_token", "template", "self")


async def render_prompt(state: Any, req: ChatCompletionRequest) -> str:
    """Messages → prompt text with the model's template (in a worker thread), or with the request's
    own when the server allows it (in the template sandbox's worker process, within its limits)."""
    try:
        messages: list[dict[str, Any]] = []
        for m in req.messages:
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.name:
                msg["name"] = m.name
            messages.append(msg)
    except FieldError as e:
        raise bad_request(str(e), param=e.param) from None
    kwargs = dict(req.chat_template_kwargs or {})
    for reserved in RESERVED_TEMPLATE_ARGS:  # set by the server, or the render functions' own names
        kwargs.pop(reserved, None)
    tok = state.engine.tokenizer
    from shoal.loader.chat_template import ChatTemplateError

    try:
        if req.chat_template is None:
            return await asyncio.to_thread(tok.apply_chat_template, messages,
                                           add_generation_prompt=req.add_generation_prompt, **kwargs)
        if not state.allow_request_chat_template:
            raise bad_request(
                "chat_template in the request is disabled on this server (start it with "
                "--allow-request-chat-template)", param="chat_template",
            )
        from shoal.server.template_sandbox import render_untrusted

        return await render_untrusted(
            req.chat_template, messages, req.add_generation_prompt, bos_token=getattr(tok, "bos_token", None),
            eos_token=getattr(tok, "eos_token", None), kwargs=kwargs, limits=state.limits.template,
        )
    except ChatTemplateError as e:
        raise bad_request(str(e), param="chat_template" if req.chat_template is not None else "messages",
                          code="chat_template_error") from None


def _token_logprobs(lps: list[TokenLogprob]) -> list[ChatTokenLogprob]:
    return [
        ChatTokenLogprob(
            token=t.token, logprob=_lp(t.logprob), bytes=list(t.token.encode("utf-8")),
            top_logprobs=[TopLogprob(token=s, logprob=_lp(v), bytes=list(s.encode("utf-8"))) for _, s, v in t.top],
        )
        for t in lps
    ]


async def create_chat_completion(state: Any, req: ChatCompletionRequest, request: Request) -> Response:
    state.check_model(req.model)
    params = sampling_params(req, req.max_new_tokens, req.num_logprobs)
    check_shape(state, req.n, 1)
    prompt = await render_prompt(state, req)
    (ids,) = await tokenize(state, [prompt], "messages", add_special_tokens=False)
    check_logprobs(state, req.num_logprobs, req.n, [len(ids)], req.max_new_tokens)
    thinking = state.reasoning and prompt_opens_thinking(prompt)
    rid = random_id("chatcmpl")
    model = state.model_name
    created = now()
    job = Job(state)

    def parser() -> ReasoningParser | None:
        return ReasoningParser(started=thinking) if state.reasoning else None

    if not req.stream:
        async def produce() -> Response:
            await job.start([{"prompt_token_ids": ids}], params, rid, "messages")
            (out,) = await job.collect()
            choices = []
            for c in out.outputs:
                p = parser()
                reasoning, content = p.split(c.text) if p else (None, c.text)
                choices.append(ChatChoice(
                    index=c.index,
                    message=AssistantMessage(content=content, reasoning_content=reasoning),
                    logprobs=ChatLogprobs(content=_token_logprobs(c.logprobs)) if c.logprobs is not None else None,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                ))
            body = ChatCompletionResponse(id=rid, created=created, model=model, choices=choices, usage=job.usage())
            return JSONResponse(body.model_dump(mode="json", exclude_none=False))

        return await respond(request, job, "chat", produce())

    exclude = None if req.include_usage else {"usage"}

    def chunk(index: int, delta: DeltaMessage, logprobs: ChatLogprobs | None = None,
              finish: str | None = None) -> str:
        c = ChatCompletionChunk(
            id=rid, created=created, model=model,
            choices=[ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)],
        )
        return sse(c, exclude)

    async def events() -> AsyncIterator[str]:
        n = req.n
        parsers = [parser() for _ in range(n)]
        chars, toks, done = [0] * n, [0] * n, [False] * n
        for i in range(n):
            yield chunk(i, DeltaMessage(role="assistant", content=""))

        def deltas(c: CompletionOutput) -> list[str]:
            i = c.index
            if done[i]:
                return []
            out = []
            new_text = c.text[chars[i]:]
            chars[i] = max(chars[i], len(c.text))
            lps = None
            if c.logprobs is not None and len(c.logprobs) > toks[i]:
                lps = ChatLogprobs(content=_token_logprobs(c.logprobs[toks[i]:]))
                toks[i] = len(c.logprobs)
            p = parsers[i]
            reasoning, content = p.feed(new_text) if p else ("", new_text)
            if c.finished and p:
                r2, c2 = p.finish()
                reasoning, content = reasoning + r2, content + c2
            if reasoning or content or lps:
                out.append(chunk(i, DeltaMessage(reasoning_content=reasoning or None, content=content or None), lps))
            if c.finished:
                done[i] = True
                out.append(chunk(i, DeltaMessage(), finish=c.finish_reason))
            return out

        for c in job.runs[0].out.outputs:  # type: ignore[union-attr]
            for e in deltas(c):
                yield e
        async for _, o in job.updates():
            for c in o.outputs:
                for e in deltas(c):
                    yield e
        if req.include_usage:
            yield sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=job.usage()))
        yield SSE_DONE

    async def start_stream() -> Response:
        await job.start([{"prompt_token_ids": ids}], params, rid, "messages")
        return EventStream(guarded_stream(job, events()), headers={"X-Request-Id": rid})

    return await respond(request, job, "chat", start_stream())
