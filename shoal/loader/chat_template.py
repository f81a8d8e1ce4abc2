"""Chat templates: the Jinja program a checkpoint ships to turn messages into a prompt.

Templates come from checkpoints, so they are untrusted code: they render in jinja2's
`ImmutableSandboxedEnvironment` with the same options and helpers as transformers
(`trim_blocks`, `lstrip_blocks`, `raise_exception`, `strftime_now`, a non-escaping `tojson`),
so prompts match `tokenizer.apply_chat_template` byte for byte.
"""

from __future__ import annotations

import functools
import json
import logging
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger(__name__)

# used when a checkpoint ships no template
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template failed to render (syntax, sandbox violation, or its own raise_exception)."""


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
    """Render `messages` with the checkpoint's template (ChatML when it has none)."""
    if not template:
        log.warning("model has no chat template; using ChatML (<|im_start|>role ... <|im_end|>)")
        template = CHATML_TEMPLATE
    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            **kwargs,
        )
    except jinja2.exceptions.TemplateError as e:  # includes SecurityError, UndefinedError, syntax errors
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
