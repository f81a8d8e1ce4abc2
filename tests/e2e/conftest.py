"""Real servers on loopback: `python -m shoal.server` in a subprocess, waited for on /health, stopped
with SIGTERM at the end of the session. The default model serves the OpenAI-client tests; a tiny
random Llama that "reasons" serves the <think> tests; a second tiny one (API key, an empty waiting
queue, a hostile chat template) serves the 401/503/sandbox tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.e2e.tiny_model import EVIL_TEMPLATE, build_tiny_reasoning_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STARTUP_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log_path: str
    api_key: str | None = None

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def client(self, **kw: object):  # noqa: ANN201 - openai.OpenAI
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0,
                             timeout=300, **kw)

    def aclient(self, **kw: object):  # noqa: ANN201 - openai.AsyncOpenAI
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0,
                                  timeout=300, **kw)

    def metrics(self) -> dict[str, float]:
        """Unlabelled view of /metrics: name → value (labels dropped; first sample wins)."""
        out: dict[str, float] = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=30).text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name_labels, value = line.rsplit(" ", 1)
            out.setdefault(name_labels.split("{", 1)[0], float(value))
            out.setdefault(name_labels, float(value))
        return out

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(args: list[str], log_path: str, api_key: str | None = None) -> Server:
    port = free_port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("SHOAL_API_KEY", None)  # the key is whatever the test passes
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - owned by the process
    cmd = [sys.executable, "-m", "shoal.server", "--host", "127.0.0.1", "--port", str(port), *args]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = Server(proc, f"http://127.0.0.1:{port}", log_path, api_key)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} during start-up:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    pytest.fail(f"server did not become healthy in {STARTUP_TIMEOUT_S}s:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default model (SmolLM2-135M-Instruct GGUF) with a small context and body limit."""
    log = str(tmp_path_factory.mktemp("server") / "default.log")
    s = start_server(["--max-model-len", "1024", "--kv-cache-memory", "256MiB", "--max-body-bytes", "256KiB"], log)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def tiny_reasoning_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_reasoning_model(str(tmp_path_factory.mktemp("tiny-reasoner")))


@pytest.fixture(scope="session")
def reasoning_server(tiny_reasoning_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = str(tmp_path_factory.mktemp("server") / "reasoning.log")
    s = start_server([
        "--model", tiny_reasoning_dir, "--served-model-name", "tiny-r1", "--kv-cache-memory", "32MiB",
        "--allow-request-chat-template",
    ], log)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def locked_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """API key required, no room in the waiting queue (every generation is 503), hostile template."""
    d = build_tiny_reasoning_model(str(tmp_path_factory.mktemp("tiny-evil")), chat_template=EVIL_TEMPLATE)
    log = str(tmp_path_factory.mktemp("server") / "locked.log")
    s = start_server(["--model", d, "--served-model-name", "tiny-locked", "--kv-cache-memory", "32MiB",
                      "--max-waiting", "0"], log, api_key="test-key-123")
    yield s
    s.stop()
