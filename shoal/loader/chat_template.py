"""Chat templates: the Jinja program a checkpoint ships to turn messages into a prompt.

Templates come from checkpoints, so they are untrusted code: they render in jinja2's
`ImmutableSandboxedEnvironment` with the same options and helpers as transformers
(`trim_blocks`, `lstrip_blocks`, `raise_exception`, `strftime_now`, a non-escaping `tojson`),
so prompts match `tokenizer.apply_chat_template` byte for byte.

The sandbox stops a template reaching Python internals, not a template that divides by zero,
recurses without end or builds a gigabyte string: every failure, whatever its type, leaves here as
`ChatTemplateError` with a one-line message (the server answers it with a 400). Bounding the time and
memory a template may use needs a separate process: `shoal.server.template_sandbox`.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from shoal.errors import ShoalError

log = logging.getLogger(__name__)

# used when a checkpoint ships no template
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# an error message a client sees is one line of at most this many characters: a template can raise
# (or provoke) an exception whose text is megabytes long
MAX_ERROR_CHARS = 500


class ChatTemplateError(ShoalError, ValueError):
    """The template failed to compile or render: syntax, sandbox violation, its own raise_exception,
    or any Python error it provoked (ZeroDivisionError, RecursionError, MemoryError, ...).

    The original exception is kept as `__cause__` for server logs; `str()` is the short message
    meant for the client.
    """


def template_error(e: Exception) -> ChatTemplateError:
    """One short line naming the exception type: a client learns what went wrong, never a traceback."""
    detail = " ".join(str(e).split())
    text = f"chat template failed: {type(e).__name__}" + (f": {detail}" if detail else "")
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return ChatTemplateError(text)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(
    template: str | None,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **kwargs: Any,
) -> str:
    """Render `messages` with the checkpoint's template (ChatML when it has none).

    Raises ChatTemplateError for every failure (see `template_error`).
    """
    # "".join of the pieces is exactly what jinja2's Template.render does (Environment.concat)
    return "".join(iter_chat_template(template, messages, add_generation_prompt, bos_token, eos_token, **kwargs))


def iter_chat_template(
    template: str | None,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **kwargs: Any,
) -> Iterator[str]:
    """`render_chat_template` as the pieces jinja2 yields, so a caller that caps the prompt's size can
    stop a template whose output grows without bound before it is all in memory.

    Raises ChatTemplateError (from the original exception) for every failure, while compiling or
    while rendering.
    """
    if not template:
        log.warning("model has no chat template; using ChatML (<|im_start|>role ... <|im_end|>)")
        template = CHATML_TEMPLATE
    try:
        yield from _compile(template).generate(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            **kwargs,
        )
    except Exception as e:  # TemplateError, SecurityError, and whatever Python raised inside the template
        raise template_error(e) from e
