"""Render a request's own chat template in a separate process, with a wall-clock, memory and
output-size limit.

Jinja's sandbox stops a template from reaching Python internals, not from spending the server's CPU
and memory: `{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}` runs for
minutes and `{{ 'x' * 10**9 }}` takes a gigabyte, and a thread cannot be stopped. So templates a
client sends (`--allow-request-chat-template`) render here instead:

    render_untrusted(...)  --JSON over a socketpair-->  worker process  (rlimits set per render)
          |  waits at most limits.timeout_s                 iter_chat_template(...), output capped
          '--- timeout / cancelled: SIGKILL the worker, start a new one on the next render

Workers are long-lived (a render costs one round trip, well under a millisecond, and compiled
templates stay cached) and are replaced whenever one is killed or hits a limit. They are forked by
multiprocessing's `forkserver`, which preloads jinja2 and `shoal.loader.chat_template` once (no
torch: `shoal.loader` imports its submodules lazily): a fork of a process that runs no server threads and holds
none of the server's sockets, in tens of milliseconds. Without `resource` or `forkserver` (not
Linux), templates render in a thread with the timeout only (the thread cannot be stopped; the caller
gets its answer on time).

Every failure is a `ChatTemplateError` (answer it with 400); a limit that was hit is the subclass
`TemplateLimitError`, whose `limit` says which one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import math
import multiprocessing
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shoal.loader.chat_template import CHATML_TEMPLATE, ChatTemplateError, iter_chat_template

try:
    import resource
except ImportError:  # not on this platform: no per-process limits, thread fallback
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LIMITS", "TemplateLimitError", "TemplateLimits", "TemplateSandbox", "default_sandbox", "render_untrusted",
    "shutdown", "warm_up",
]

MiB = 2**20
_HEADER = struct.Struct("!I")  # every message: 4-byte big-endian length, then UTF-8 JSON
# what the forkserver imports once, so a worker starts in milliseconds. CPython <= 3.13 re-runs the
# server's main module in each new worker all the same (as spawn does): it must be import-safe
# (`if __name__ == "__main__":`), and is cheap for shoal's entry points (shoal.cli is preloaded)
_PRELOAD = ["__main__", "jinja2", "jinja2.sandbox", "shoal.loader.chat_template", "shoal.cli", __name__]
_RENDERS_PER_WORKER = 1000  # then the worker is replaced, so no slow growth in one process lasts


@dataclass(frozen=True, slots=True)
class TemplateLimits:
    """What one render of an untrusted template may use."""

    timeout_s: float = 2.0  # wall clock, compile + render
    memory_bytes: int = 256 * MiB  # address space above the worker's size when the render starts
    max_output_chars: int = 4 * MiB  # characters of rendered prompt

    def __post_init__(self) -> None:
        if not (self.timeout_s > 0 and self.memory_bytes > 0 and self.max_output_chars > 0):
            raise ValueError(f"TemplateLimits must all be positive, got {self}")


DEFAULT_LIMITS = TemplateLimits()


class TemplateLimitError(ChatTemplateError):
    """The template hit one of its limits; `limit` is "timeout", "memory" or "output"."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


def _limit_error(limit: str, limits: TemplateLimits) -> TemplateLimitError:
    """The message names the limit and its value, so a template author knows what to change."""
    if limit == "timeout":
        text = f"chat template exceeded its time limit ({limits.timeout_s:g} s)"
    elif limit == "memory":
        text = f"chat template exceeded its memory limit ({limits.memory_bytes // MiB} MiB)"
    else:
        text = f"chat template output exceeded its size limit ({limits.max_output_chars} characters)"
    return TemplateLimitError(limit, text)


# --------------------------------------------------------------------------- worker process side


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _send_message(sock: socket.socket, obj: dict[str, Any]) -> None:
    body = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    sock.sendall(_HEADER.pack(len(body)) + body)


def _vm_size() -> int:
    """This process's address space in bytes (what RLIMIT_AS counts)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _rlimits(req: dict[str, Any]) -> Iterator[None]:
    """Cap address space at (size now + memory_bytes) and CPU time at (used + timeout_s + 2 s) for
    one render, then lift both. The CPU cap only matters when the server died mid-render and nobody is
    left to kill this worker: SIGXCPU ends it."""
    memory_bytes, timeout_s = int(req["memory_bytes"]), float(req["timeout_s"])
    as_soft, as_hard = resource.getrlimit(resource.RLIMIT_AS)
    cpu_soft, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)

    def capped(value: int, hard: int) -> int:
        return value if hard == resource.RLIM_INFINITY else min(value, hard)

    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu_now = math.ceil(used.ru_utime + used.ru_stime)
    resource.setrlimit(resource.RLIMIT_AS, (capped(_vm_size() + memory_bytes, as_hard), as_hard))
    resource.setrlimit(resource.RLIMIT_CPU, (capped(cpu_now + math.ceil(timeout_s) + 2, cpu_hard), cpu_hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (as_soft, as_hard))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft, cpu_hard))


class _OutputTooLarge(Exception):
    pass


def _render_capped(req: dict[str, Any]) -> str:
    """Render, stopping as soon as the output passes max_output_chars (before it is all in memory)."""
    cap = int(req["max_output_chars"])
    pieces: list[str] = []
    size = 0
    with contextlib.closing(iter_chat_template(
        req["template"], req["messages"], req["add_generation_prompt"],
        req["bos_token"], req["eos_token"], **req["kwargs"],
    )) as it:
        for piece in it:
            size += len(piece)
            if size > cap:
                raise _OutputTooLarge
            pieces.append(piece)
    return "".join(pieces)


def _render_reply(req: dict[str, Any], with_rlimits: bool = True) -> dict[str, Any]:
    """One render → its reply: {"text"}, {"error"} (the template's fault) or {"limit"} (it hit one).
    Never raises for the template's sake."""
    try:
        with _rlimits(req) if with_rlimits else contextlib.nullcontext():
            text = _render_capped(req)
    except _OutputTooLarge:
        return {"limit": "output"}
    except MemoryError:
        return {"limit": "memory"}
    except ChatTemplateError as e:
        if isinstance(e.__cause__, MemoryError):
            return {"limit": "memory"}
        return {"error": str(e)}
    return {"text": text}


def _worker_main(sock: socket.socket) -> None:
    """A worker's life: answer renders one at a time until the server closes its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server; it stops us
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a worker killed by SIGXCPU leaves no core file
    with contextlib.suppress(OSError):
        os.nice(10)  # a template that spins until its deadline yields the CPU to the engine's decode steps
    sock.setblocking(True)
    while True:
        header = _recv_exact(sock, _HEADER.size)
        if header is None:
            return
        body = _recv_exact(sock, _HEADER.unpack(header)[0])
        if body is None:
            return
        _send_message(sock, _render_reply(json.loads(body)))


# --------------------------------------------------------------------------- server side


class _Worker:
    """A worker process and the server's end of its socket."""

    def __init__(self, process: multiprocessing.process.BaseProcess, sock: socket.socket) -> None:
        self.process = process
        self.sock = sock
        self.renders = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid

    async def call(self, request: bytes) -> dict[str, Any]:
        """Send one request and wait for its reply. EOFError when the worker died."""
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, request)
        header = await self._recv_exact(loop, _HEADER.size)
        reply = json.loads(await self._recv_exact(loop, _HEADER.unpack(header)[0]))
        self.renders += 1
        return reply

    async def _recv_exact(self, loop: asyncio.AbstractEventLoop, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = await loop.sock_recv(self.sock, min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError("template worker closed its socket")
            buf += chunk
        return bytes(buf)

    def kill(self) -> None:
        """SIGKILL now: the worker may be in the middle of a template that would never end."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.process.kill()
        self.sock.close()
        with contextlib.suppress(OSError, ValueError, AssertionError):
            self.process.join(0)  # reaps it when already gone; multiprocessing reaps the rest later

    def exit_description(self) -> str:
        """How the process ended, for an error message (blocks up to a second: call in a thread)."""
        self.process.join(1.0)
        code = self.process.exitcode
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"signal {-code}"
        return f"exit code {code}"


@functools.cache
def _warn_no_isolation() -> None:
    log.warning("no resource limits or forkserver on %s: request chat templates render in a thread, "
                "with the time limit only (a runaway template keeps its thread busy)", sys.platform)


def _isolation_available() -> bool:
    return resource is not None and "forkserver" in multiprocessing.get_all_start_methods() and \
        os.path.exists("/proc/self/statm")


class TemplateSandbox:
    """A pool of up to `max_workers` template workers. Renders beyond that wait for a free worker
    (the wait does not count against the timeout; a client that leaves stops waiting).

    Safe to use from one event loop at a time; `close()` kills every worker.
    """

    def __init__(self, max_workers: int | None = None) -> None:
        self.max_workers = max_workers or max(1, min(4, os.cpu_count() or 1))
        self.isolated = _isolation_available()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._starting = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        if self.isolated:
            self._ctx = multiprocessing.get_context("forkserver")
            self._ctx.set_forkserver_preload(_PRELOAD)
        else:
            _warn_no_isolation()

    # ---- public

    async def render(
        self,
        template: str,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        *,
        bos_token: str | None,
        eos_token: str | None,
        kwargs: dict[str, Any],
        limits: TemplateLimits,
    ) -> str:
        """The prompt, or ChatTemplateError (TemplateLimitError when a limit was hit)."""
        request = _encode(_request(template, messages, add_generation_prompt, bos_token, eos_token, kwargs, limits))
        if self.isolated:
            reply = await self._render_in_worker(request, limits)
        else:
            reply = await self._render_in_thread(request, limits)
        if "limit" in reply:
            raise _limit_error(reply["limit"], limits)
        if "error" in reply:
            raise ChatTemplateError(reply["error"])
        return reply["text"]

    async def start(self) -> None:
        """Start the forkserver and one worker now, so the first request does not pay ~1-2 s for it."""
        if self.isolated:
            self._release(await self._acquire(), keep=True)

    def close(self) -> None:
        """Kill every worker (idle and busy); renders in flight get a ChatTemplateError. Idempotent."""
        self._closed = True
        for w in [*self._idle, *self._busy]:
            w.kill()
        self._idle.clear()
        self._busy.clear()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def worker_pids(self) -> list[int]:
        """Pids of live workers (for tests and diagnostics)."""
        return [w.pid for w in [*self._idle, *self._busy] if w.pid is not None]

    # ---- the pool

    async def _acquire(self) -> _Worker:
        while True:
            if self._closed:
                raise ChatTemplateError("chat template sandbox is shut down")
            while self._idle:
                worker = self._idle.pop()
                if worker.process.is_alive():
                    self._busy.add(worker)
                    return worker
                worker.kill()
            if len(self._busy) + self._starting < self.max_workers:
                return await self._spawn()
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._wake_one()  # we were woken but will not take the worker: pass it on
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)

    async def _spawn(self) -> _Worker:
        """Start a worker in a thread (the first start waits for the forkserver's imports). A start
        that outlives a cancelled caller still joins the pool instead of leaking."""
        self._starting += 1
        task = asyncio.ensure_future(asyncio.to_thread(self._start_process))
        try:
            worker = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._adopt)
            raise
        except BaseException:
            self._starting -= 1
            self._wake_one()
            raise
        self._starting -= 1
        if self._closed:
            worker.kill()
            raise ChatTemplateError("chat template sandbox is shut down")
        self._busy.add(worker)
        return worker

    def _adopt(self, task: asyncio.Future[_Worker]) -> None:
        self._starting -= 1
        if task.cancelled() or task.exception() is not None:
            self._wake_one()
            return
        worker = task.result()
        self._busy.add(worker)
        self._release(worker, keep=not self._closed)

    def _start_process(self) -> _Worker:
        ours, theirs = socket.socketpair()
        process = self._ctx.Process(target=_worker_main, args=(theirs,), name="shoal-template-worker", daemon=True)
        try:
            process.start()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return _Worker(process, ours)

    def _release(self, worker: _Worker, keep: bool) -> None:
        self._busy.discard(worker)
        if keep and not self._closed:
            self._idle.append(worker)
        else:
            worker.kill()
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    # ---- rendering

    async def _render_in_worker(self, request: bytes, limits: TemplateLimits) -> dict[str, Any]:
        worker = await self._acquire()
        keep = False
        try:
            try:
                reply = await asyncio.wait_for(worker.call(request), limits.timeout_s)
            except asyncio.TimeoutError:
                raise _limit_error("timeout", limits) from None
            except (EOFError, OSError):
                if self._closed:
                    raise ChatTemplateError("chat template sandbox was shut down during the render") from None
                # RLIMIT_AS can make CPython abort instead of raising MemoryError
                how = await asyncio.to_thread(worker.exit_description)
                raise ChatTemplateError(f"chat template crashed its sandbox process ({how}); it may have hit "
                                        f"the memory limit ({limits.memory_bytes // MiB} MiB)") from None
            keep = "limit" not in reply and worker.renders < _RENDERS_PER_WORKER
        finally:
            self._release(worker, keep)  # not kept (timeout, cancelled, limit hit): killed here, at once
        return reply

    async def _render_in_thread(self, request: bytes, limits: TemplateLimits) -> dict[str, Any]:
        """Fallback without process isolation: the output cap holds, the time limit only bounds how long
        the caller waits (the thread runs on), and there is no memory limit. The request makes the same
        JSON round trip as to a worker, so both paths see the same inputs."""
        req = json.loads(request[_HEADER.size:])
        try:
            return await asyncio.wait_for(asyncio.to_thread(_render_reply, req, False), limits.timeout_s)
        except asyncio.TimeoutError:
            raise _limit_error("timeout", limits) from None


def _request(
    template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, bos_token: str | None,
    eos_token: str | None, kwargs: dict[str, Any], limits: TemplateLimits,
) -> dict[str, Any]:
    return {
        # an empty template means ChatML, as in render_chat_template (without its warning about the model)
        "template": template or CHATML_TEMPLATE, "messages": messages,
        "add_generation_prompt": bool(add_generation_prompt), "bos_token": bos_token, "eos_token": eos_token,
        "kwargs": kwargs, "timeout_s": limits.timeout_s, "memory_bytes": limits.memory_bytes,
        "max_output_chars": limits.max_output_chars,
    }


def _encode(req: dict[str, Any]) -> bytes:
    """Plain JSON data only: what a worker receives came from the client, so nothing that unpickles.
    Inputs that are not JSON data are refused as a client error."""
    try:
        body = json.dumps(req, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError) as e:
        raise ChatTemplateError(f"chat template inputs must be JSON data: {e}") from None
    return _HEADER.pack(len(body)) + body


# --------------------------------------------------------------------------- module-level default

_default: TemplateSandbox | None = None


def default_sandbox() -> TemplateSandbox:
    """The process-wide sandbox `render_untrusted` uses (created on first use)."""
    global _default
    if _default is None or _default._closed:
        _default = TemplateSandbox()
    return _default


async def render_untrusted(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    *,
    bos_token: str | None,
    eos_token: str | None,
    kwargs: dict[str, Any],
    limits: TemplateLimits = DEFAULT_LIMITS,
) -> str:
    """Render a template the client sent, in a worker process, within `limits`.

    Same output as `render_chat_template` (inputs travel as JSON, so tuples arrive as lists). Raises
    ChatTemplateError for anything wrong with the template, TemplateLimitError (a subclass) when it hit
    a limit. Cancelling the awaiting task kills the worker at once.
    """
    return await default_sandbox().render(
        template, messages, add_generation_prompt,
        bos_token=bos_token, eos_token=eos_token, kwargs=kwargs, limits=limits,
    )


async def warm_up() -> None:
    """Call at server start-up when request templates are allowed: starts the forkserver and a worker."""
    t0 = time.perf_counter()
    await default_sandbox().start()
    log.info("chat template sandbox ready in %.2f s", time.perf_counter() - t0)


def shutdown() -> None:
    """Call at server shutdown: kills the workers (the forkserver exits with the server)."""
    global _default
    if _default is not None:
        _default.close()
        _default = None
