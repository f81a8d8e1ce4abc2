"""Hostile chat templates: every failure is a ChatTemplateError (a 400, never a 500), and a template a
client sends cannot spend more than its time, memory and output limits, nor keep running after the
client left.

Part 1 renders in-process (`render_chat_template`): non-Jinja exceptions become ChatTemplateError.
Part 2 renders in the sandbox's worker processes (`shoal.server.template_sandbox`): the same output
as in-process for valid templates, the right limit for each bomb, and no worker left behind.
No assertion here is about elapsed time; the per-test timeout only stops a hung run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shoal.loader.chat_template import CHATML_TEMPLATE, MAX_ERROR_CHARS, ChatTemplateError, render_chat_template
from shoal.server import template_sandbox
from shoal.server.template_sandbox import DEFAULT_LIMITS, TemplateLimitError, TemplateLimits, TemplateSandbox

pytestmark = pytest.mark.timeout(120)

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "héllo <b> \"quoted\" \n 你好"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "again", "name": "bob"},
]

# templates that fail with a plain Python exception inside the sandbox: (template, exception type named)
PYTHON_ERRORS = [
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{{ range(10**9) }}", "OverflowError"),  # jinja2's sandbox caps range() at MAX_RANGE
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{{ 'a' * 'b' }}", "TypeError"),
    ("{{ 'x' + 1 }}", "TypeError"),
    ("{{ '%s' % (1, 2) }}", "TypeError"),
    ("{{ '(' * 5000 }}{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "RecursionError"),  # while compiling
    ("{{ (10 ** 5000) | string }}", "ValueError"),  # int→str digit limit
]
JINJA_ERRORS = [
    ("{% for %}", "TemplateSyntaxError"),
    ("{{ messages[0]['content'].__class__ }}x{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    ("{{ raise_exception('bad role') }}", "TemplateError"),
]

BOMBS = {  # template → the limit it hits
    "{{ 'x' * 10**9 }}": "memory",
    "{% set a = 'x' * 10**4 %}{% set b = a * 10**4 %}{% set c = b * 10**4 %}{{ c | length }}": "memory",
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}": "timeout",
    "{% for i in range(99999) %}{% for j in range(99999) %}{{ 'x' * 1000 }}{% endfor %}{% endfor %}": "output",
    "{{ 'y' * (5 * 2**20) }}": "output",
}

# a template with what real ones use: loops, conditions, namespace, tojson, kwargs, special tokens
RICH_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for message in messages %}{% set ns.n = ns.n + 1 %}"
    "{% if message['role'] == 'system' %}<<SYS>>{{ message['content'] | trim }}<</SYS>>\n"
    "{% elif message['role'] == 'user' %}"
    "[{{ loop.index }}] {{ message.get('name', 'user') }}: {{ message['content'] }}\n"
    "{% else %}{{ message['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}{{ ns.n }} {{ extra | default('none') }}"
    "{% if add_generation_prompt %}\nAssistant:{% endif %}"
)
KWARGS: dict[str, Any] = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"é": [1, 2.5, None]}}}],
    "extra": True,
}
FAST = TemplateLimits(timeout_s=0.5)  # only changes how long a test that waits for the timeout takes


def limits_for(limit: str) -> TemplateLimits:
    """A short time limit for the bombs that hit it; the default (2 s) for the others, so that a slow
    machine reaches their memory or output limit before its time limit."""
    return FAST if limit == "timeout" else TemplateLimits()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def process_gone(pid: int) -> bool:
    """True when the pid has exited (gone, or a zombie waiting for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone before or while we read
        return True
    return state in ("Z", "X")


def wait_gone(pid: int, within_s: float = 20.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.02)
    return process_gone(pid)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[TemplateSandbox]:
    sb = TemplateSandbox(max_workers=2)
    if not sb.isolated:
        pytest.skip("no forkserver or resource limits on this platform")
    run(sb.start())
    yield sb
    sb.close()


async def render(sb: TemplateSandbox, template: str, limits: TemplateLimits = DEFAULT_LIMITS,
                 messages: list[dict[str, Any]] = MESSAGES, **kwargs: Any) -> str:
    return await sb.render(template, messages, True, bos_token="<s>", eos_token="</s>", kwargs=kwargs, limits=limits)


# --------------------------------------------------------------------------- 1. in-process


@pytest.mark.parametrize("template, name", PYTHON_ERRORS + JINJA_ERRORS)
def test_every_failure_is_a_chat_template_error_naming_its_type(template: str, name: str) -> None:
    with pytest.raises(ChatTemplateError) as err:
        render_chat_template(template, MESSAGES, True)
    message = str(err.value)
    assert message.startswith(f"chat template failed: {name}")
    assert "\n" not in message and len(message) <= MAX_ERROR_CHARS
    assert "Traceback" not in message and 'File "' not in message
    assert type(err.value.__cause__).__name__ == name  # the original stays for server logs


def test_a_huge_error_message_is_cut_short() -> None:
    with pytest.raises(ChatTemplateError) as err:
        render_chat_template("{{ raise_exception('boom ' * 100000) }}", MESSAGES, True)
    assert len(str(err.value)) == MAX_ERROR_CHARS and str(err.value).endswith("...")


def test_memory_error_in_process_is_a_chat_template_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without limits a real MemoryError would take the machine's memory first; provoke one instead."""
    def out_of_memory(*_: Any) -> None:
        raise MemoryError

    with pytest.raises(ChatTemplateError, match="^chat template failed: MemoryError$"):
        render_chat_template("{{ oom() }}", MESSAGES, True, oom=out_of_memory)


def test_valid_templates_render_as_jinja_does() -> None:
    """Same text as jinja2's own Template.render (render now joins the generated pieces)."""
    from shoal.loader.chat_template import _compile

    for template in (CHATML_TEMPLATE, RICH_TEMPLATE):
        want = _compile(template).render(messages=MESSAGES, add_generation_prompt=True, bos_token="<s>",
                                         eos_token="</s>", **KWARGS)
        assert render_chat_template(template, MESSAGES, True, "<s>", "</s>", **KWARGS) == want


# --------------------------------------------------------------------------- 2. in a worker process


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, RICH_TEMPLATE, "{{ strftime_now('%Y') | length }}", "plain"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_valid_templates_render_the_same_as_in_process(sandbox: TemplateSandbox, template: str,
                                                       generation_prompt: bool) -> None:
    got = run(sandbox.render(template, MESSAGES, generation_prompt, bos_token="<s>", eos_token="</s>",
                             kwargs=KWARGS, limits=TemplateLimits()))
    assert got == render_chat_template(template, MESSAGES, generation_prompt, "<s>", "</s>", **KWARGS)


def test_unusual_text_survives_the_trip(sandbox: TemplateSandbox) -> None:
    """Lone surrogates (JSON allows "\\ud800"), NULs and astral characters come back unchanged; an empty
    template means ChatML, as in-process."""
    messages = [{"role": "user", "content": "a\ud800b\x00c😀"}]
    for template in ("{{ messages[0]['content'] }}", ""):
        got = run(sandbox.render(template, messages, True, bos_token=None, eos_token=None, kwargs={},
                                 limits=TemplateLimits()))
        assert got == render_chat_template(template, messages, True)


def test_output_just_under_the_limit_is_returned(sandbox: TemplateSandbox) -> None:
    limits = TemplateLimits(max_output_chars=100_000)
    assert run(render(sandbox, "{{ 'z' * 100000 }}", limits)) == "z" * 100_000
    with pytest.raises(TemplateLimitError, match="100000 characters"):
        run(render(sandbox, "{{ 'z' * 100001 }}", limits))


@pytest.mark.parametrize("template, name", PYTHON_ERRORS + JINJA_ERRORS)
def test_template_errors_come_back_as_the_same_message(sandbox: TemplateSandbox, template: str, name: str) -> None:
    with pytest.raises(ChatTemplateError) as err:
        run(render(sandbox, template))
    assert not isinstance(err.value, TemplateLimitError)
    assert str(err.value).startswith(f"chat template failed: {name}")


@pytest.mark.parametrize("template, limit", BOMBS.items())
def test_each_bomb_hits_its_limit(sandbox: TemplateSandbox, template: str, limit: str) -> None:
    with pytest.raises(TemplateLimitError) as err:
        run(render(sandbox, template, limits_for(limit)))
    assert err.value.limit == limit
    assert isinstance(err.value, ChatTemplateError)  # the caller's `except ChatTemplateError` → 400
    value = {"timeout": "0.5 s", "memory": "256 MiB", "output": f"{4 * 2**20} characters"}[limit]
    assert value in str(err.value)


def test_the_sandbox_still_works_after_every_bomb(sandbox: TemplateSandbox) -> None:
    for template, limit in BOMBS.items():
        with pytest.raises(TemplateLimitError):
            run(render(sandbox, template, limits_for(limit)))
        assert run(render(sandbox, CHATML_TEMPLATE)) == render_chat_template(CHATML_TEMPLATE, MESSAGES, True)


def test_a_timed_out_worker_is_killed(sandbox: TemplateSandbox) -> None:
    async def go() -> int:
        task = asyncio.create_task(render(sandbox, next(t for t, k in BOMBS.items() if k == "timeout"), FAST))
        pid = await busy_worker(sandbox)
        with pytest.raises(TemplateLimitError, match="time limit"):
            await task
        return pid

    pid = run(go())
    assert wait_gone(pid)
    assert pid not in sandbox.worker_pids()


async def busy_worker(sb: TemplateSandbox) -> int:
    """The pid of the worker rendering the one render in flight."""
    while not sb._busy:
        await asyncio.sleep(0.01)
    (worker,) = sb._busy
    assert worker.pid is not None
    return worker.pid


def test_cancelling_the_render_kills_the_worker_at_once(sandbox: TemplateSandbox) -> None:
    """A client that disconnects cancels its task; the template must stop with it (no timeout wait)."""
    cpu_bomb = next(t for t, k in BOMBS.items() if k == "timeout")

    async def go() -> int:
        task = asyncio.create_task(render(sandbox, cpu_bomb, TemplateLimits(timeout_s=300)))
        pid = await busy_worker(sandbox)
        await asyncio.sleep(0.2)  # let it start rendering (the test holds either way)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pid

    pid = run(go())
    assert wait_gone(pid)  # with a 300 s limit, only the cancellation can have ended it
    assert run(render(sandbox, "ok")) == "ok"


def test_renders_beyond_the_pool_wait_and_a_cancelled_waiter_leaves_no_trace() -> None:
    sb = TemplateSandbox(max_workers=1)
    cpu_bomb = next(t for t, k in BOMBS.items() if k == "timeout")

    async def go() -> list[Any]:
        bomb = asyncio.create_task(render(sb, cpu_bomb, FAST))
        await busy_worker(sb)
        leaver = asyncio.create_task(render(sb, "never"))
        stayers = [asyncio.create_task(render(sb, "{{ messages | length }}")) for _ in range(3)]
        await asyncio.sleep(0.05)
        leaver.cancel()
        return await asyncio.gather(bomb, leaver, *stayers, return_exceptions=True)

    try:
        bomb, leaver, *stayers = run(go())
        assert isinstance(bomb, TemplateLimitError) and bomb.limit == "timeout"
        assert isinstance(leaver, asyncio.CancelledError)
        assert stayers == [str(len(MESSAGES))] * 3
        assert len(sb.worker_pids()) == 1
    finally:
        sb.close()


def test_a_render_cancelled_while_its_worker_starts_leaks_nothing() -> None:
    sb = TemplateSandbox(max_workers=1)

    async def go() -> str:
        task = asyncio.create_task(render(sb, "first"))
        await asyncio.sleep(0)  # now inside the start of the first worker
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await render(sb, "second")  # the pool's one slot was given back

    try:
        assert run(go()) == "second"
        assert len(sb.worker_pids()) == 1
    finally:
        sb.close()


def test_a_worker_that_dies_mid_render_is_a_chat_template_error(sandbox: TemplateSandbox) -> None:
    """RLIMIT_AS can make CPython abort rather than raise MemoryError; any death reads the same."""
    cpu_bomb = next(t for t, k in BOMBS.items() if k == "timeout")

    async def go() -> None:
        task = asyncio.create_task(render(sandbox, cpu_bomb, TemplateLimits(timeout_s=300)))
        os.kill(await busy_worker(sandbox), signal.SIGKILL)
        with pytest.raises(ChatTemplateError, match="crashed its sandbox process .*SIGKILL"):
            await task

    run(go())
    assert run(render(sandbox, "ok")) == "ok"


def test_workers_hold_none_of_the_servers_sockets() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    sb = TemplateSandbox(max_workers=1)
    try:
        assert run(render(sb, "up")) == "up"  # the worker is past its start-up, in its loop
        (pid,) = sb.worker_pids()
        targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert f"socket:[{os.fstat(listener.fileno()).st_ino}]" not in targets
        assert len([t for t in targets if t.startswith("socket:")]) == 1  # only its own end of the socketpair
    finally:
        sb.close()
        listener.close()


def test_close_kills_the_workers_and_refuses_new_renders() -> None:
    sb = TemplateSandbox(max_workers=2)
    run(sb.start())
    pids = sb.worker_pids()
    assert pids
    sb.close()
    assert all(wait_gone(pid) for pid in pids)
    with pytest.raises(ChatTemplateError, match="shut down"):
        run(render(sb, "x"))


def test_render_untrusted_and_shutdown() -> None:
    async def go() -> str:
        await template_sandbox.warm_up()
        return await template_sandbox.render_untrusted(
            RICH_TEMPLATE, MESSAGES, True, bos_token=None, eos_token=None, kwargs=KWARGS, limits=TemplateLimits())

    try:
        assert run(go()) == render_chat_template(RICH_TEMPLATE, MESSAGES, True, None, None, **KWARGS)
        pids = template_sandbox.default_sandbox().worker_pids()
    finally:
        template_sandbox.shutdown()
    assert all(wait_gone(pid) for pid in pids)


def test_inputs_that_are_not_json_data_are_refused(sandbox: TemplateSandbox) -> None:
    with pytest.raises(ChatTemplateError, match="JSON"):
        run(render(sandbox, "x", extra={1, 2}))


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        TemplateLimits(timeout_s=0)


# --------------------------------------------------------------------------- 3. without process isolation


@pytest.fixture
def thread_sandbox(monkeypatch: pytest.MonkeyPatch) -> TemplateSandbox:
    monkeypatch.setattr(template_sandbox, "_isolation_available", lambda: False)
    sb = TemplateSandbox()
    assert not sb.isolated
    return sb


def test_thread_fallback_renders_the_same_and_keeps_the_output_limit(thread_sandbox: TemplateSandbox) -> None:
    assert run(render(thread_sandbox, RICH_TEMPLATE, **KWARGS)) == \
        render_chat_template(RICH_TEMPLATE, MESSAGES, True, "<s>", "</s>", **KWARGS)
    with pytest.raises(TemplateLimitError) as err:
        run(render(thread_sandbox, "{{ 'y' * 101 }}", TemplateLimits(max_output_chars=100)))
    assert err.value.limit == "output"
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        run(render(thread_sandbox, "{{ 1/0 }}"))


def test_thread_fallback_answers_on_time(thread_sandbox: TemplateSandbox) -> None:
    """The thread cannot be stopped, so the bomb is a finite one (~25M loop steps, seconds of CPU)."""
    finite_bomb = "{% for i in range(5000) %}{% for j in range(5000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateLimitError) as err:
        run(render(thread_sandbox, finite_bomb, TemplateLimits(timeout_s=0.01)))
    assert err.value.limit == "timeout"


def test_no_worker_outlives_the_tests(sandbox: TemplateSandbox) -> None:
    """Kept last: every pid the module's sandbox still holds is alive, and nothing else lingers."""
    assert all(not process_gone(pid) for pid in sandbox.worker_pids())
    assert len(sandbox.worker_pids()) <= sandbox.max_workers
    assert os.getpid() not in sandbox.worker_pids()

