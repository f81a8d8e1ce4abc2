"""SamplingParams: how one request turns logits into tokens and when it stops. Standard library only."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# seeds go to torch.Generator.manual_seed, which takes a 64-bit integer
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _bad(name: str, why: str) -> ValueError:
    """A refused value; `param` names the field for the server's 400."""
    err = ValueError(f"{name} {why}")
    err.param = name  # type: ignore[attr-defined]
    return err


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token (0: only the chosen token)
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise _bad(name, f"must be a finite number, got {getattr(self, name)}")
        if self.n < 1:
            raise _bad("n", f"must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise _bad("temperature", f"must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise _bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise _bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise _bad("repetition_penalty", f"must be positive, got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise _bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise _bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise _bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise _bad("min_tokens", f"must be in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise _bad("logprobs", f"must be in [0, 20], got {self.logprobs}")
        if self.seed is not None and not INT64_MIN <= self.seed <= INT64_MAX:
            raise _bad("seed", f"must be a 64-bit signed integer, got {self.seed}")
        if any(t < 0 for t in self.stop_token_ids):
            raise _bad("stop_token_ids", "must be non-negative token ids")

    def check_vocab(self, vocab_size: int) -> None:
        """The checks that need the model: every token id and top_k within its vocabulary."""
        if self.top_k > vocab_size:
            raise _bad("top_k", f"must be at most the vocabulary size ({vocab_size}), got {self.top_k}")
        bad_ids = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad_ids:
            raise _bad("stop_token_ids", f"must be below the vocabulary size ({vocab_size}), got {bad_ids[0]}")

    def child_seed(self, i: int) -> int | None:
        """The seed of the i-th of n samples: seed + i, wrapped into 64 bits."""
        if self.seed is None:
            return None
        return (self.seed + i - INT64_MIN) % 2**64 + INT64_MIN

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )
