"""Streaming detokenization: turn one new token id at a time into a text delta.

Decoding tokens one by one is wrong twice over: a multi-byte character can span tokens (the
partial bytes decode to U+FFFD), and SentencePiece-style decoders drop or add a leading space
depending on context. So, as vLLM and TGI do, we decode a small window twice — the tokens
already emitted from `prefix_offset`, and the same plus the new ones — and emit the difference
once it no longer ends in U+FFFD.
"""

from __future__ import annotations

from .tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
_CONTEXT = 5  # prompt tokens of left context for the first delta


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids)
        self._prefix_offset = max(len(self._ids) - _CONTEXT, 0)
        self._read_offset = len(self._ids)
        self._pieces: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ('' while a character is unfinished)."""
        self._ids.append(int(token_id))
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        delta = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._pieces.append(delta)
        return delta

    def flush(self) -> str:
        """Emit what is still held back (at the end of a request); may contain U+FFFD if the
        model produced bytes that never formed a valid character."""
        if self._read_offset == len(self._ids):
            return ""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        delta = full[len(prefix) :] if full.startswith(prefix) else full
        self._prefix_offset = self._read_offset = len(self._ids)
        if delta:
            self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return "".join(self._pieces)
