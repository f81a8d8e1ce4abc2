"""Bounded work per request: what one HTTP request may ask of the server, checked before any of it
is done, each refusal an OpenAI-shaped 400 that names the field and the flag that sets the limit.

A request is refused up front when it can never succeed or would cost far more than its size
suggests: more samples (`n`) than `--max-n`; more prompts × n than the waiting queue holds
(`--max-waiting`); more logprob entries (prompts × n × tokens × (1 + top_logprobs)) than
`--max-logprob-entries`; or a prompt text so long that it cannot fit the context whatever it
tokenizes to (so it is never tokenized: that costs seconds for megabytes of text). A request's own
chat template (`--allow-request-chat-template`) renders within `template` (time, memory, output).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from shoal.server.errors import bad_request
from shoal.server.template_sandbox import TemplateLimits


@dataclass(frozen=True)
class ServerLimits:
    max_n: int = 128  # OpenAI's own limit
    max_logprob_entries: int = 2**18  # about 13 MB of JSON
    header_timeout_s: float = 10.0  # a connection must send a whole request head within this
    body_timeout_s: float = 30.0  # ... and each part of a body within this
    max_header_bytes: int = 16 * 2**10
    template: TemplateLimits = field(default_factory=TemplateLimits)  # a request's own chat template

    def __post_init__(self) -> None:
        for name in ("max_n", "max_logprob_entries", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def check_shape(state: Any, n: int, num_prompts: int) -> None:
    """n and the number of prompts, before anything is tokenized."""
    limits: ServerLimits = state.limits
    if n > limits.max_n:
        raise bad_request(f"n is {n}; this server allows at most {limits.max_n} (--max-n)", param="n")
    queue = getattr(state.engine, "max_waiting", None)
    # one prompt always fits in time (503 while the queue is full); more than the queue can never
    if queue is not None and num_prompts > 1 and num_prompts * n > max(queue, n):
        raise bad_request(
            f"this request needs {num_prompts * n} sequences ({num_prompts} prompts × n={n}); the server's "
            f"waiting queue holds {queue} (--max-waiting): send fewer prompts per request", param="prompt")


def check_prompt_chars(state: Any, text: str, param: str) -> None:
    """Refuse text that cannot fit the context whatever it tokenizes to, without tokenizing it."""
    per_token = getattr(state.engine.tokenizer, "max_chars_per_token", None)
    ctx = getattr(state.engine, "max_model_len", None)
    if isinstance(per_token, int) and ctx and len(text) > per_token * ctx:
        raise bad_request(
            f"the prompt has {len(text)} characters; this model's context is {ctx} tokens and one token "
            f"covers at most {per_token} characters, so it cannot fit", param=param, code="context_length_exceeded")


async def tokenize(state: Any, texts: list[str], param: str, add_special_tokens: bool = True) -> list[list[int]]:
    """Size-check, then tokenize in a worker thread: the event loop keeps serving other streams and
    /health meanwhile, and the engine thread never tokenizes."""
    for t in texts:
        check_prompt_chars(state, t, param)
    encode = state.engine.tokenizer.encode
    return await asyncio.to_thread(lambda: [encode(t, add_special_tokens=add_special_tokens) for t in texts])


def check_logprobs(state: Any, top: int | None, n: int, prompt_lens: list[int], max_tokens: int | None) -> None:
    """prompts × n × tokens × (1 + top_logprobs) entries, with tokens the most each prompt can get."""
    if top is None:
        return
    ctx = getattr(state.engine, "max_model_len", None) or 0
    tokens = sum(min(max_tokens or ctx, max(ctx - p, 0)) if ctx else (max_tokens or 0) for p in prompt_lens)
    entries = n * tokens * (1 + top)
    limit = state.limits.max_logprob_entries
    if entries > limit:
        raise bad_request(
            f"this request could return {entries} logprob entries (n={n} × up to {tokens} tokens × "
            f"{1 + top} per token); this server allows {limit} (--max-logprob-entries): lower n, "
            "max_tokens or top_logprobs", param="logprobs")
