"""The `shoal` command line: version, generate (streaming), chat, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shoal import __version__
from tests.tiny import make_llama


def _shoal(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shoal", *args], capture_output=True, text=True,
                          input=stdin, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_llama(tmp_path_factory.mktemp("cli")))


def test_version():
    r = _shoal("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"shoal {__version__}"


def test_generate_streams_text(tiny):
    r = _shoal("generate", "w1 w2 w3", "--model", tiny, "--max-tokens", "6", "--dtype", "float32",
               "--kv-cache-memory", "4MiB")
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert 1 <= len(words) <= 6 and all(w.startswith("w") or len(w) == 1 for w in words)


def test_chat_session_exits(tiny):
    r = _shoal("chat", "--model", tiny, "--max-tokens", "4", "--kv-cache-memory", "4MiB",
               stdin="w5 w6\nw7\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") >= 3


@pytest.mark.parametrize("args,needle", [
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--model", "/tmp"], "/tmp"),
])
def test_bad_model_is_one_line_error(args, needle):
    r = _shoal("generate", "hi", *args)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("shoal: error:") and needle in lines[0], r.stderr
