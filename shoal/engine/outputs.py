"""What the engine hands back: one RequestOutput per request, with one CompletionOutput per sample (n)."""

from __future__ import annotations

from dataclasses import dataclass, field


class RequestFailed(RuntimeError):
    """One request could not go on (its sampling or detokenizing failed); the others in its batch
    did. `client_error`: the request's own parameters caused it (the server answers 400)."""

    def __init__(self, message: str, client_error: bool = False, param: str | None = None) -> None:
        super().__init__(message)
        self.client_error = client_error
        self.param = param


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    # top alternatives at this position: list of (token_id, token text, logprob), best first
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: RequestFailed | None = None  # set when the request ended because it failed
