"""Splitting a reasoning model's output into `reasoning_content` and `content`.

DeepSeek-R1 and its distills write their chain of thought between `<think>` and `</think>`, then the
answer. Newer R1 chat templates already put `<think>\\n` at the end of the prompt, so the output starts
*inside* the thought and only `</think>` appears; `ReasoningParser(started=True)` covers that case.
Output that never closes its thought (cut by max_tokens) is all reasoning, as DeepSeek's API does.

The parser is incremental: `feed(delta)` returns the (reasoning, content) parts of each new piece of
text, holding back a tail that might be the start of a tag split across two deltas; `finish()` flushes it.
`split(text)` is the one-shot form for non-streaming responses and gives the same answer as feeding
the text in any pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"


def prompt_opens_thinking(prompt: str, start: str = THINK_START, end: str = THINK_END) -> bool:
    """True when the rendered prompt ends inside an open `<think>` block (the template opened it)."""
    i = prompt.rfind(start)
    return i != -1 and prompt.rfind(end) < i and not prompt[i + len(start):].strip()


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


@dataclass
class ReasoningParser:
    started: bool = False  # the prompt already opened <think>
    start: str = THINK_START
    end: str = THINK_END

    def __post_init__(self) -> None:
        # states: "begin" (before any text: a leading <think> may open a thought),
        # "reasoning" (inside), "content" (after </think>, or no thought at all)
        self._state = "reasoning" if self.started else "begin"
        self._buf = ""
        self.had_thought = self.started

    @property
    def in_reasoning(self) -> bool:
        return self._state == "reasoning"

    def feed(self, delta: str) -> tuple[str, str]:
        """New text → (reasoning part, content part); either may be empty."""
        self._buf += delta
        reasoning, content = [], []
        while self._buf:
            if self._state == "begin":
                stripped = self._buf.lstrip()
                if stripped.startswith(self.start):
                    self._buf = stripped[len(self.start):]
                    self._state = "reasoning"
                    self.had_thought = True
                    continue
                if not stripped or self.start.startswith(stripped):
                    break  # could still become <think>: wait for more
                self._state = "content"
                continue
            if self._state == "reasoning":
                i = self._buf.find(self.end)
                if i != -1:
                    reasoning.append(self._buf[:i])
                    self._buf = self._buf[i + len(self.end):]
                    self._state = "content"
                    continue
                hold = _partial_suffix(self._buf, self.end)
                reasoning.append(self._buf[: len(self._buf) - hold])
                self._buf = self._buf[len(self._buf) - hold:]
                break
            content.append(self._buf)  # content: everything from here on is the answer
            self._buf = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """The end of the output: flush what was held back."""
        buf, self._buf = self._buf, ""
        if self._state == "reasoning":
            return buf, ""
        return "", buf

    def split(self, text: str) -> tuple[str | None, str | None]:
        """One-shot: the whole output → (reasoning_content, content); None where a part is absent."""
        r1, c1 = self.feed(text)
        r2, c2 = self.finish()
        reasoning = (r1 + r2) if self.had_thought else None
        return reasoning, (c1 + c2) or None
